"""Job status: per-worker counters, per-iteration figures, and the JobStatus message built from them."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from swarmtune.entries import Iteration
from swarmtune.wire import ledger_pb2, service_pb2 as pb

RATE_WINDOW_MS = 60_000
RECENT_ITERATIONS = 100


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
class IterationFigures:
    """What the operator sees of one closed iteration."""

    iteration: int
    members: int
    rewarded: tuple[float, ...]
    retention: tuple[tuple[str, float], ...]
    alerts: tuple[str, ...]
    evaluation_s: float = 0.0  # 0 for iterations closed before this coordinator started
    overhead_s: float = 0.0
    wall_s: float = 0.0


def figures_of(body: Iteration, evaluation_s: float = 0.0, overhead_s: float = 0.0, wall_s: float = 0.0) -> IterationFigures:
    rewarded_members = {r.record.member for r in body.results}
    rewarded = tuple(reward for m, reward in zip(body.members, body.rewards) if m.member in rewarded_members)
    retention = tuple(figure for report in body.retention for figure in report.record.figures)
    return IterationFigures(body.iteration, len(body.members), rewarded, retention, body.alerts, evaluation_s, overhead_s, wall_s)


def summary_message(figures: IterationFigures) -> pb.IterationSummary:
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
        evaluation_s=figures.evaluation_s,
        overhead_s=figures.overhead_s,
        wall_s=figures.wall_s,
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
