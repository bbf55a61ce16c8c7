"""Job status: what this coordinator observed (workers' counters, close timings) and the JobStatus message."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Collection, Iterable, Sequence

from swarmtune import identity
from swarmtune.coordinator.chain import History
from swarmtune.coordinator.figures import RECENT_ITERATIONS, IterationFigures
from swarmtune.coordinator.round import Round
from swarmtune.jobspec import JobSpec
from swarmtune.wire import ledger_pb2, service_pb2 as pb

RATE_WINDOW_MS = 60_000


@dataclass
class WorkerStats:
    """Counters of one worker key since this coordinator started."""

    operator: str
    capacity: int
    accepted: int = 0
    rejected: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    last_seen_ms: int = 0
    recent: deque[tuple[int, int]] = field(default_factory=deque)  # (ms, results accepted)

    def count(self, now_ms: int, accepted: int, rejected: Iterable[str]) -> None:
        self.last_seen_ms = now_ms
        if accepted:
            self.accepted += accepted
            self.recent.append((now_ms, accepted))
        for reason in rejected:
            self.rejected += 1
            self.rejects[reason] += 1
        self._trim(now_ms)

    def rate(self, now_ms: int) -> float:
        """Accepted results per second over the last minute."""
        self._trim(now_ms)
        return sum(n for _, n in self.recent) / (RATE_WINDOW_MS / 1000)

    def _trim(self, now_ms: int) -> None:
        while self.recent and self.recent[0][0] < now_ms - RATE_WINDOW_MS:
            self.recent.popleft()


@dataclass(frozen=True)
class CloseTiming:
    """How long one iteration took, as this coordinator measured it (none for earlier iterations)."""

    iteration: int
    evaluation_s: float  # opened -> last needed result
    overhead_s: float  # last needed result -> entry appended and broadcast
    wall_s: float

    @classmethod
    def measured(cls, iteration: int, opened_ms: int, settled_ms: int, done_ms: int) -> CloseTiming:
        return cls(iteration, (settled_ms - opened_ms) / 1000, (done_ms - settled_ms) / 1000, (done_ms - opened_ms) / 1000)


@dataclass
class Observed:
    """What this coordinator saw since it started, beyond the ledger: workers' counters, close timings."""

    workers: dict[bytes, WorkerStats] = field(default_factory=dict)
    timings: deque[CloseTiming] = field(default_factory=lambda: deque(maxlen=RECENT_ITERATIONS))


def summary_message(figures: IterationFigures, timing: CloseTiming | None) -> pb.IterationSummary:
    rewards = figures.rewarded
    return pb.IterationSummary(
        iteration=figures.iteration,
        members=figures.members,
        rewarded=len(rewards),
        reward_mean=sum(rewards) / len(rewards) if rewards else 0.0,
        reward_max=max(rewards, default=0.0),
        reward_min=min(rewards, default=0.0),
        retention=[ledger_pb2.Figure(name=name, value=value) for name, value in figures.retention],
        alerts=figures.alerts,
        evaluation_s=timing.evaluation_s if timing else 0.0,
        overhead_s=timing.overhead_s if timing else 0.0,
        wall_s=timing.wall_s if timing else 0.0,
    )


def worker_message(worker_id: str, stats: WorkerStats, connected: bool, strikes: int, revoked: bool, now_ms: int) -> pb.WorkerStatus:
    return pb.WorkerStatus(
        worker_id=worker_id,
        operator_id=stats.operator,
        capacity=stats.capacity,
        connected=connected,
        accepted=stats.accepted,
        rejected=stats.rejected,
        results_per_s=stats.rate(now_ms),
        strikes=strikes,
        revoked=revoked,
        last_seen_ms=stats.last_seen_ms,
        rejects=dict(stats.rejects),
    )


def alerts_of(recent: Sequence[IterationFigures]) -> list[str]:
    return [f"iteration {f.iteration}: {alert}" for f in recent for alert in f.alerts]


def _state(finished: bool, paused: bool, open_round: bool, connected: bool) -> int:
    """A JobStatus.State value."""
    if finished:
        return pb.JobStatus.FINISHED
    if paused and not open_round:
        return pb.JobStatus.PAUSED
    return pb.JobStatus.RUNNING if connected else pb.JobStatus.WAITING


def job_status(
    spec: JobSpec,
    history: History,
    current: Round | None,
    observed: Observed,
    connected: Collection[bytes],
    finished: bool,
    paused: bool,
    now_ms: int,
) -> pb.JobStatus:
    """The JobStatus message: a pure function of the ledger so far, the open round and what was observed."""
    rejects: Counter[str] = Counter()
    workers = []
    for key, stats in sorted(observed.workers.items()):
        rejects.update(stats.rejects)
        workers.append(
            worker_message(identity.fingerprint(key), stats, key in connected, history.strikes[key], key in history.revoked, now_ms)
        )
    recent = list(history.figures)
    timings = {t.iteration: t for t in observed.timings}
    return pb.JobStatus(
        job_id=spec.job_id,
        state=_state(finished, paused, current is not None, bool(connected)),
        iteration=current.open.iteration if current else history.last_iteration,
        iterations_total=spec.iterations,
        closed=history.last_iteration,
        population=spec.population,
        settled=len(current.settled) if current else 0,
        results_open=current.result_count() if current else 0,
        head_index=history.head.entry.index,
        head_hash=history.head.hash,
        recent=[summary_message(f, timings.get(f.iteration)) for f in recent],
        workers=workers,
        rejects=dict(rejects),
        alerts=alerts_of(recent),
    )
