"""A job's course as its ledger records it: per-iteration rewards, retention figures and alerts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from swarmtune.entries import Genesis, Iteration, StoredEntry
from swarmtune.jobspec import JobSpec, parse_job_spec


@dataclass(frozen=True)
class IterationPoint:
    """One closed iteration: the rewards shaping used, the center model's figures, alerts, and when."""

    iteration: int
    index: int  # the ledger entry that closed it
    timestamp_ms: int
    members: int
    rewards: tuple[float, ...]  # of the rewarded members, in member order
    figures: tuple[tuple[str, float], ...]  # signed (name, value) measured on the center model
    alerts: tuple[str, ...]

    @property
    def reward_mean(self) -> float | None:
        return math.fsum(self.rewards) / len(self.rewards) if self.rewards else None

    @property
    def reward_min(self) -> float | None:
        return min(self.rewards, default=None)

    @property
    def reward_max(self) -> float | None:
        return max(self.rewards, default=None)


def iteration_point(index: int, timestamp_ms: int, body: Iteration) -> IterationPoint:
    figures = tuple(figure for report in body.retention for figure in report.record.figures)
    return IterationPoint(body.iteration, index, timestamp_ms, body.plan.population, body.rewarded, figures, body.alerts)


def iteration_points(ledger_entries: Iterable[StoredEntry]) -> tuple[IterationPoint, ...]:
    """Every closed iteration of a ledger, in order."""
    return tuple(
        iteration_point(e.entry.index, e.entry.timestamp_ms, e.entry.body)
        for e in ledger_entries
        if isinstance(e.entry.body, Iteration)
    )


def job_spec_of(ledger_entries: list[StoredEntry]) -> JobSpec:
    """The job spec genesis records; ValueError if the ledger does not start with a genesis."""
    if not ledger_entries or not isinstance(ledger_entries[0].entry.body, Genesis):
        raise ValueError("the ledger does not start with a genesis entry; read the whole ledger")
    return parse_job_spec(ledger_entries[0].entry.body.job_spec)


def figure_series(points: Iterable[IterationPoint], name: str) -> tuple[tuple[int, float], ...]:
    """(iteration, value) of every measurement of one figure (a center model measurement)."""
    return tuple((p.iteration, value) for p in points for figure, value in p.figures if figure == name)


def figure_names(points: Iterable[IterationPoint]) -> tuple[str, ...]:
    """Names of the figures recorded, in order of first appearance."""
    return tuple(dict.fromkeys(name for p in points for name, _ in p.figures))


def is_center_reward(name: str, spec: JobSpec) -> bool:
    """A figure named after the job's own task is the center model's reward on that task (held out);
    every other figure is a retention probe of a prior skill."""
    return name in (spec.task, spec.task_options.get("name"))
