"""Closing an iteration: settled rewards -> shaped integer coefficients -> the iteration entry body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from swarmtune import shaping
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.coordinator.redundancy import Verdict, judge
from swarmtune.entries import Iteration, RetentionReport, Signed, WorkerResult
from swarmtune.jobspec import JobSpec


@dataclass(frozen=True)
class Closing:
    """An iteration's entry body and the verdicts it rests on."""

    body: Iteration
    verdicts: Mapping[int, Verdict]  # member -> verdict over its counted replicas

    @property
    def rewarded(self) -> tuple[float, ...]:
        """Rewards that shaping used, in member order."""
        return tuple(v.reward for _, v in sorted(self.verdicts.items()) if v.reward is not None)


def replicas_by_member(results: Iterable[Signed[WorkerResult]], revoked: frozenset[bytes]) -> dict[int, dict[bytes, float]]:
    """member -> worker key -> reward, leaving out revoked workers (their results stop counting)."""
    replicas: dict[int, dict[bytes, float]] = {}
    for signed in results:
        if signed.record.worker_key not in revoked:
            replicas.setdefault(signed.record.member, {})[signed.record.worker_key] = signed.record.reward
    return replicas


def verdicts_of(results: Iterable[Signed[WorkerResult]], revoked: frozenset[bytes], tolerance: float) -> dict[int, Verdict]:
    return {member: judge(replicas, tolerance) for member, replicas in replicas_by_member(results, revoked).items()}


def build_iteration(
    spec: JobSpec,
    open_iteration: OpenIteration,
    results: Sequence[Signed[WorkerResult]],
    revoked: frozenset[bytes],
    retention: Sequence[Signed[RetentionReport]] = (),
    alerts: Sequence[str] = (),
) -> Closing:
    """The iteration entry body: every counted result (members without a standing majority and revoked
    workers are left out), the settled rewards, and shaping's integer coefficients in member order."""
    verdicts = verdicts_of(results, revoked, spec.redundancy_tolerance)
    standing = {m: v.reward for m, v in verdicts.items() if v.reward is not None}
    counted = sorted(
        (r for r in results if r.record.member in standing and r.record.worker_key not in revoked),
        key=lambda r: (r.record.member, r.record.worker_key),
    )
    order = [m.member for m in open_iteration.members if m.member in standing]
    shaped = dict(zip(order, shaping.coefficients([standing[m] for m in order], spec.shaping, spec.alpha)))
    members = open_iteration.members
    body = Iteration(
        iteration=open_iteration.iteration,
        opened_head=open_iteration.head_hash,
        members=members,
        results=tuple(counted),
        coefficients=tuple(shaped.get(m.member, 0) for m in members),
        rewards=tuple(float(standing.get(m.member, 0.0)) for m in members),
        shaping=spec.shaping,
        retention=tuple(retention),
        alerts=tuple(alerts),
    )
    return Closing(body, {m: v for m, v in verdicts.items() if m in standing})


def retention_alerts(
    reports: Sequence[Signed[RetentionReport]], baselines: Mapping[str, float], threshold: float
) -> tuple[tuple[str, ...], dict[str, float]]:
    """Alerts for figures that fell more than `threshold` below their first recorded value, and the
    baselines after these reports (a figure's first value becomes its baseline)."""
    updated = dict(baselines)
    alerts = []
    for report in reports:
        for name, value in report.record.figures:
            base = updated.setdefault(name, value)
            if threshold > 0 and base - value > threshold:
                alerts.append(f"retention {name} fell from {base:.4f} to {value:.4f} (alert threshold {threshold})")
    return tuple(alerts), updated
