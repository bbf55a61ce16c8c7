"""After the demo: the exported ledger, its audit with replay, the PNG of the curves and the summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from swarmtune.demo.follow import Measurement

if TYPE_CHECKING:
    from swarmtune.client.audit import AuditReport

ACCURACY_LABEL = "center model, held-out exact match (demo's replica)"


@dataclass(frozen=True)
class Summary:
    """What one demo run showed; `to_json` is the `--summary` / `--json` object."""

    job_id: str
    iterations: int
    workers: int
    population: int
    task_accuracy_before: float
    task_accuracy_after: float
    retention_before: float
    retention_after: float
    audit_ok: bool
    audit_problem: str | None
    final_state_hash: str | None
    wall_seconds: float
    build_seconds: float  # installing builtin:tiny on first use (0 when cached)
    curve: tuple[Measurement, ...]
    ledger: str
    plot: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_ledger(data_dir: Path, job_id: str) -> list[bytes]:
    """Every stored entry of the job, from the embedded Redis the coordinator left in data_dir."""
    from swarmtune.embedded_redis import open_store

    with open_store(None, data_dir) as store:
        return list(store.read(job_id))


def export_ledger(stored: Sequence[bytes], out: Path) -> None:
    from swarmtune import ledgerfile

    ledgerfile.write(out, stored)


def audit_ledger(stored: Sequence[bytes], model_dir: Path, coordinator_key: bytes) -> AuditReport:
    """The client's full audit, replaying from a freshly loaded base model."""
    from swarmtune.client.audit import audit
    from swarmtune.models import load_model

    return audit(stored, load_model(model_dir)[0], coordinator_key=coordinator_key)


def save_plot(stored: Sequence[bytes], curve: Sequence[Measurement], out: Path) -> None:
    """The client's reward and retention plot, with the replayed held-out accuracy drawn over the rewards."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from swarmtune import ledger
    from swarmtune.client.plot import DPI, plot_spec, render

    figure = render(plot_spec([entry for _, entry in ledger.walk(stored)]))
    rewards = figure.axes[0]  # render draws rewards above, retention below
    rewards.plot([p.iteration for p in curve], [p.task_accuracy for p in curve], color="tab:red", marker="D", label=ACCURACY_LABEL)
    rewards.legend(loc="best", fontsize="small")
    FigureCanvasAgg(figure)
    figure.savefig(out, format="png", dpi=DPI)


def points(before: float, after: float) -> str:
    return f"{before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points)"


def describe(summary: Summary, task: str, probe: str) -> str:
    """The human report printed at the end."""
    minutes, seconds = divmod(round(summary.wall_seconds), 60)
    build = f", {summary.build_seconds:.0f} s of it installing builtin:tiny" if summary.build_seconds else ""
    audit = "OK" if summary.audit_ok else f"FAILED: {summary.audit_problem}"
    return "\n".join(
        [
            f"swarmtune demo: job {summary.job_id}, {summary.iterations} iterations, {summary.workers} workers, "
            f"population {summary.population}, {minutes}:{seconds:02d} wall{build}",
            f"  held-out accuracy, {task}: {points(summary.task_accuracy_before, summary.task_accuracy_after)}",
            f"  retention probe, {probe}: {points(summary.retention_before, summary.retention_after)}",
            f"  audit with replay: {audit}; final state {summary.final_state_hash or '-'}",
            f"  ledger: {summary.ledger}  (check it: swarmtune audit --ledger {summary.ledger} --replay)",
            f"  curves: {summary.plot}",
        ]
    )
