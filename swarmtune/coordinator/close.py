"""Closing an iteration: settled rewards -> shaped integer coefficients -> the iteration entry body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from swarmtune import assignlog, batches, coefficients, identity, shaping
from swarmtune.assignlog import Given
from swarmtune.batches import Batch, MemberResult, Recorded
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.entries import Iteration, RetentionReport, Signed
from swarmtune.jobspec import JobSpec
from swarmtune.redundancy import Verdict, to_revoke, verdicts_of, within_minority


@dataclass(frozen=True)
class Closing:
    """An iteration's entry body and the verdicts it rests on."""

    body: Iteration
    verdicts: Mapping[int, Verdict]  # member -> verdict over its counted replicas

    @property
    def rewarded(self) -> tuple[float, ...]:
        """Rewards that shaping used, in member order."""
        return tuple(v.reward for _, v in sorted(self.verdicts.items()) if v.reward is not None)


@dataclass(frozen=True)
class Panel:
    """Who judges an iteration's members: the job's referees (none: majority rule), the members this
    iteration spot-checks, and the draw and candidates the opening assignment followed (for the entry)."""

    referees: frozenset[bytes] = frozenset()
    spot: frozenset[int] = frozenset()
    draw: bytes = b""
    candidates: tuple[bytes, ...] = ()
    capacities: tuple[int, ...] = ()  # parallel to candidates: what each asked for
    operators: tuple[int, ...] = ()  # assignlog.operator_ranks of the candidates' operators


def dispute_alerts(verdicts: Mapping[int, Verdict], referees: Collection[bytes]) -> tuple[str, ...]:
    """Without referees a dissent may be an outvoted honest worker: the operator is told each time."""
    disputed = sorted(m for m, v in verdicts.items() if v.dissenters)
    if referees or not disputed:
        return ()
    return (f"replicas disagreed on members {disputed} and no referee is admitted to settle them; admit one with --referee",)


def revocations(
    closing: Closing, counts: Mapping[bytes, int], threshold: int, referees: frozenset[bytes], revoked: frozenset[bytes], operators: Mapping[bytes, str]
) -> tuple[list[bytes], tuple[str, ...]]:
    """Keys this close revokes, and the alerts it raises (PROTOCOL §6.7): without referees, one per
    close with a dissent, and instead of revoking keys of half or more of the active operators (the
    operators of the workers whose results it counts: `operators` from the ledger, else the key)."""
    revoking = to_revoke(counts, threshold, revoked)
    # Raised from the verdicts before revoking: the dissents that revoke a key are not recorded.
    raised = dispute_alerts(closing.verdicts, referees)
    active = {r.batch.worker_key: operators.get(r.batch.worker_key) or r.batch.worker_key.hex() for r in closing.body.batches}
    if referees or not revoking or within_minority(revoking, active):
        return revoking, raised
    who = sorted(identity.fingerprint(key) for key in revoking)
    withheld = (
        f"workers {who} reached {threshold} strikes, half or more of the {len(set(active.values()))} active operators: "
        "none revoked, since without referees the majority may be the liars; admit a referee (--referee)"
    )
    return [], (*raised, withheld)


def recorded_batches(counted: Sequence[MemberResult], source: Mapping[tuple[bytes, int], Batch]) -> tuple[Recorded, ...]:
    """The batches the counted results came from, each with the members it does not count (another
    batch's, unsettled, rejected), in a stable order: by worker key, then first member."""
    taken: dict[bytes, set[int]] = {}  # batch signature -> members counted from it
    used: dict[bytes, Batch] = {}
    for result in counted:
        batch = source[result.worker_key, result.member]
        used[batch.signature] = batch
        taken.setdefault(batch.signature, set()).add(result.member)
    ordered = sorted(used.values(), key=lambda b: (b.worker_key, b.members[0], b.signature))
    return tuple(Recorded(b, tuple(m for m in b.members if m not in taken[b.signature])) for b in ordered)


def recorded_rewards(body: Iteration) -> dict[bytes, dict[int, float]]:
    """worker -> member -> reward, as an iteration entry counts them (a late resend of them is a duplicate)."""
    out: dict[bytes, dict[int, float]] = {}
    for recorded in body.batches:
        out.setdefault(recorded.batch.worker_key, {}).update(zip(*recorded.counted()))
    return out


def build_iteration(
    spec: JobSpec,
    open_iteration: OpenIteration,
    results: Sequence[MemberResult],
    source: Mapping[tuple[bytes, int], Batch],
    revoked: frozenset[bytes],
    retention: Sequence[Signed[RetentionReport]] = (),
    alerts: Sequence[str] = (),
    panel: Panel = Panel(),
    given: Sequence[Given] = (),
) -> Closing:
    """The iteration entry body: the batches of every counted result (members that did not settle and
    revoked workers are left out), the settled rewards a reader cannot infer, and shaping's integer
    coefficients in member order. `source`: the batch each result was accepted from; `given`: the
    members given to a worker after the opening."""
    verdicts = verdicts_of(results, revoked, spec.redundancy_tolerance, panel.referees, panel.spot)
    standing = {m: v.reward for m, v in verdicts.items() if v.reward is not None}
    counted = [r for r in results if r.member in standing and r.worker_key not in revoked]
    recorded = recorded_batches(counted, source)
    others, assignments = assignlog.encode(given, panel.candidates, [r.batch.worker_key for r in recorded])
    # In the order of the workers the entry names, so that each batch's worker index costs nothing
    # where it is the next worker's (PROTOCOL §5.2).
    index = {key: i for i, key in enumerate((*panel.candidates, *others))}
    recorded = tuple(sorted(recorded, key=lambda r: (index[r.batch.worker_key], r.batch.members[0], r.batch.signature)))
    body = Iteration(
        iteration=open_iteration.iteration,
        opened_head=open_iteration.head_hash,
        plan=open_iteration.plan,
        batches=recorded,
        coefficients=(),
        disputed=batches.disputed_rewards(batches.tally(recorded)[1], standing),
        shaping=spec.shaping,
        retention=tuple(retention),
        alerts=tuple(alerts),
        draw=panel.draw,
        candidates=panel.candidates,
        capacities=panel.capacities,
        operators=panel.operators,
        others=others,
        assignments=assignments,
    )
    # Derived from the body exactly as every reader of the entry derives them (it records none), so
    # the digest live workers apply cannot differ from what a replay applies.
    rule = shaping.Rule(spec.shaping, spec.alpha, spec.group_width)
    return Closing(body.with_coefficients(coefficients.derived(body, rule)), {m: v for m, v in verdicts.items() if m in standing})


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
