"""One closed iteration's figures as its entry records them: what the operator's status shows of it."""

from __future__ import annotations

from dataclasses import dataclass

from swarmtune.entries import Iteration

RECENT_ITERATIONS = 100  # closed iterations the status keeps


@dataclass(frozen=True)
class IterationFigures:
    """What the operator sees of one closed iteration, as its entry records it."""

    iteration: int
    members: int
    rewarded: tuple[float, ...]
    retention: tuple[tuple[str, float], ...]
    alerts: tuple[str, ...]


def figures_of(body: Iteration) -> IterationFigures:
    rewarded_members = {r.record.member for r in body.results}
    rewarded = tuple(reward for m, reward in zip(body.members, body.rewards) if m.member in rewarded_members)
    retention = tuple(figure for report in body.retention for figure in report.record.figures)
    return IterationFigures(body.iteration, len(body.members), rewarded, retention, body.alerts)
