"""Closing an iteration: settled rewards -> shaped integer coefficients -> the iteration entry body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from swarmtune import assignlog, batches, coefficients, identity, shaping
from swarmtune.assignlog import Given
from swarmtune.batches import Batch, Recorded
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.entries import Iteration, RetentionReport, Signed
from swarmtune.jobspec import JobSpec
from swarmtune.redundancy import Verdict, judge, to_revoke, within_minority


@dataclass(frozen=True)
class Closing:
    """An iteration's entry body and the verdicts it rests on."""

    body: Iteration
    # member -> verdict, for the members that were judged: those with several counted replicas, and
    # every member under referees (a lone replica under majority rule stands as it is: no verdict).
    verdicts: Mapping[int, Verdict]


@dataclass(frozen=True)
class Accepted:
    """What an open iteration accepted, as its close reads it: the round's own maps, not copies."""

    held: Mapping[bytes, Mapping[int, float]]  # worker -> member -> reward
    replicas: Mapping[int, Mapping[bytes, float]]  # member -> worker -> reward
    several: Collection[int]  # the members with more than one replica
    batches: Mapping[bytes, Mapping[bytes, Batch]]  # worker -> signature -> a batch it was accepted from
    source: Mapping[tuple[bytes, int], Batch]  # (worker, member) -> the batch it was accepted from


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
    if referees or not revoking:
        return revoking, raised
    active = {r.batch.worker_key: operators.get(r.batch.worker_key) or r.batch.worker_key.hex() for r in closing.body.batches}
    if within_minority(revoking, active):
        return revoking, raised
    who = sorted(identity.fingerprint(key) for key in revoking)
    withheld = (
        f"workers {who} reached {threshold} strikes, half or more of the {len(set(active.values()))} active operators: "
        "none revoked, since without referees the majority may be the liars; admit a referee (--referee)"
    )
    return [], (*raised, withheld)


def judged(accepted: Accepted, revoked: frozenset[bytes], tolerance: float, panel: Panel) -> tuple[dict[int, float], dict[int, Verdict]]:
    """(member -> the reward it settles on, member -> verdict of the members judged), revoked workers
    left out. Under majority rule a lone replica stands as it is, so only members with several replicas
    are judged: no work per member where each has one (at 1,000 workers x 16, every member)."""
    if panel.referees:  # a referee's replica or a spot check can overturn even a lone replica
        replicas = {m: {k: r for k, r in got.items() if k not in revoked} for m, got in accepted.replicas.items()}
        verdicts = {m: judge(got, tolerance, panel.referees, m in panel.spot) for m, got in replicas.items() if got}
        return {m: v.reward for m, v in verdicts.items() if v.reward is not None}, verdicts
    standing: dict[int, float] = {}
    for key, got in accepted.held.items():
        if key not in revoked:
            standing.update(got)
    verdicts = {}
    for member in sorted(accepted.several):
        counted = {k: r for k, r in accepted.replicas[member].items() if k not in revoked}
        if len(counted) > 1:
            verdicts[member] = judge(counted, tolerance)
            reward = verdicts[member].reward
            if reward is None:
                del standing[member]
            else:
                standing[member] = reward
    return standing, verdicts


def recorded_batches(accepted: Accepted, standing: Mapping[int, float], revoked: frozenset[bytes]) -> list[Recorded]:
    """The batches the counted results (of standing members, from workers not revoked) came from, each
    with the members it does not count (another batch's, unsettled, rejected)."""
    out = []
    for key, got in accepted.held.items():
        if key in revoked:
            continue
        counted = got.keys() if standing.keys() >= got.keys() else got.keys() & standing.keys()
        mine = accepted.batches.get(key, {})
        if len(mine) == 1:  # the common case: the worker's one batch this iteration
            groups: list[tuple[Batch, Collection[int]]] = [(batch, counted) for batch in mine.values()]
        else:
            taken: dict[bytes, set[int]] = {}
            for member in counted:
                taken.setdefault(accepted.source[key, member].signature, set()).add(member)
            groups = [(mine[signature], members) for signature, members in taken.items()]
        for batch, members in groups:
            if members:
                whole = len(members) == len(batch.members)
                out.append(Recorded(batch, () if whole else tuple(m for m in batch.members if m not in members)))
    return out


def recorded_rewards(body: Iteration) -> dict[bytes, dict[int, float]]:
    """worker -> member -> reward, as an iteration entry counts them (a late resend of them is a duplicate)."""
    out: dict[bytes, dict[int, float]] = {}
    for recorded in body.batches:
        out.setdefault(recorded.batch.worker_key, {}).update(zip(*recorded.counted()))
    return out


def build_iteration(
    spec: JobSpec,
    open_iteration: OpenIteration,
    accepted: Accepted,
    revoked: frozenset[bytes],
    retention: Sequence[Signed[RetentionReport]] = (),
    alerts: Sequence[str] = (),
    panel: Panel = Panel(),
    given: Sequence[Given] = (),
) -> Closing:
    """The iteration entry body: the batches of every counted result (members that did not settle and
    revoked workers are left out), the settled rewards a reader cannot infer, and shaping's integer
    coefficients in member order. `given`: the members given to a worker after the opening."""
    standing, verdicts = judged(accepted, revoked, spec.redundancy_tolerance, panel)
    recorded = recorded_batches(accepted, standing, revoked)
    others, assignments = assignlog.encode(given, panel.candidates, sorted({r.batch.worker_key for r in recorded}))
    # In the order of the workers the entry names, so that each batch's worker index costs nothing
    # where it is the next worker's (PROTOCOL §5.2).
    index = {key: i for i, key in enumerate((*panel.candidates, *others))}
    ordered = tuple(sorted(recorded, key=lambda r: (index[r.batch.worker_key], r.batch.members[0], r.batch.signature)))
    body = Iteration(
        iteration=open_iteration.iteration,
        opened_head=open_iteration.head_hash,
        plan=open_iteration.plan,
        batches=ordered,
        coefficients=(),
        disputed=batches.disputed_rewards(batches.tally(ordered)[1], standing),
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
