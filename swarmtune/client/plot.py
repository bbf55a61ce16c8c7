"""Plots of a job's course: population reward spread, center reward, and retention figures (PNG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from swarmtune.client.history import IterationPoint, figure_names, figure_series, is_center_reward, iteration_points, job_spec_of
from swarmtune.entries import StoredEntry

WIDTH_IN, HEIGHT_IN, DPI = 10.0, 7.0, 100  # a 1000 × 700 pixel PNG


@dataclass(frozen=True)
class PlotSpec:
    """What to draw: the job's iterations, which figure is the center's task reward, and the title."""

    job_id: str
    points: tuple[IterationPoint, ...]
    center_figures: tuple[str, ...]  # figures measuring the center model on the job's own task
    iterations_total: int

    @property
    def retention_figures(self) -> tuple[str, ...]:
        return tuple(name for name in figure_names(self.points) if name not in self.center_figures)


def plot_spec(ledger_entries: list[StoredEntry]) -> PlotSpec:
    """What a ledger gives to plot (genesis first)."""
    job = job_spec_of(ledger_entries)
    points = iteration_points(ledger_entries)
    centers = tuple(name for name in figure_names(points) if is_center_reward(name, job))
    return PlotSpec(job.job_id, points, centers, job.iterations)


def _draw_rewards(axes: Axes, spec: PlotSpec) -> None:
    rewarded = [p for p in spec.points if p.rewards]
    x = [p.iteration for p in rewarded]
    axes.fill_between(
        x, [p.reward_min for p in rewarded], [p.reward_max for p in rewarded], alpha=0.25, color="tab:blue", label="population min–max"
    )
    axes.plot(x, [p.reward_mean for p in rewarded], color="tab:blue", marker=".", label="population mean")
    for name in spec.center_figures:
        series = figure_series(spec.points, name)
        if series:
            axes.plot(*zip(*series), color="tab:green", marker="o", label=f"center model, held out ({name})")
    axes.set_ylabel("reward")
    axes.set_title("Reward of the perturbed population (band, mean) and of the center model")


def _draw_retention(axes: Axes, spec: PlotSpec) -> None:
    for name in spec.retention_figures:
        axes.plot(*zip(*figure_series(spec.points, name)), marker="s", label=f"retention: {name}")
    if not spec.retention_figures:
        axes.text(0.5, 0.5, "no retention figures recorded", ha="center", va="center", transform=axes.transAxes, color="gray")
    axes.set_ylabel("retention figure (center model)")
    axes.set_xlabel("iteration")
    axes.set_title("Prior skill kept (retention probe on the center model)")


def _mark_alerts(axes_list: Sequence[Axes], points: Sequence[IterationPoint]) -> None:
    alerted = [p.iteration for p in points if p.alerts]
    for axes in axes_list:
        for position, iteration in enumerate(alerted):
            axes.axvline(iteration, color="tab:red", linestyle="--", linewidth=1, label="alert (retention or dispute)" if position == 0 else None)


def render(spec: PlotSpec) -> Figure:
    """The figure: rewards above, retention below, sharing the iteration axis."""
    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    _draw_rewards(top, spec)
    _draw_retention(bottom, spec)
    _mark_alerts((top, bottom), spec.points)
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize="small")
    closed = spec.points[-1].iteration if spec.points else 0
    figure.suptitle(f"swarmtune job {spec.job_id}: {closed} of {spec.iterations_total} iterations")
    return figure


def save_png(spec: PlotSpec, out: Path) -> Path:
    """Render to a PNG file (Agg canvas: no display, no global pyplot state)."""
    figure = render(spec)
    FigureCanvasAgg(figure)
    figure.savefig(out, format="png", dpi=DPI)
    return out
