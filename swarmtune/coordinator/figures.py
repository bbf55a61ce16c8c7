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
    retention = tuple(figure for report in body.retention for figure in report.record.figures)
    return IterationFigures(body.iteration, body.plan.population, body.rewarded, retention, body.alerts)
