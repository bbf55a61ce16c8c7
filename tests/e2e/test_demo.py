"""`swarmtune demo`: Ctrl-C stops every process and keeps the ledger; a rerun resumes and audits; the job file."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from swarmtune import ledger, ledgerfile
from swarmtune.demo.follow import Measurement
from swarmtune.demo.job import DemoJob
from swarmtune.demo.progress import Display, progress_line
from swarmtune.client.status import IterationSummary, JobStatus
from swarmtune.embedded_redis import open_store
from swarmtune.jobspec import load_job_spec, parse_job_spec

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 20
# Small enough to finish in seconds on a loaded 2-core machine, long enough to be interrupted mid-way.
SMALL = ["--iterations", str(ITERATIONS), "--population", "8", "--prompts", "16", "--measure-every", "5"]
SUMMARY_KEYS = {
    "task_accuracy_before", "task_accuracy_after", "retention_before", "retention_after", "audit_ok",
    "wall_seconds", "iterations", "final_state_hash", "workers", "curve",
}  # fmt: skip
RUN_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Demo:
    """A running `swarmtune demo`; its output goes to files, so chatty output (progress bars, a rebuilt
    model's training) can never fill a pipe nobody reads and stall the demo."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    def finish(self, timeout: float) -> tuple[str, str]:
        """Wait for the exit; the whole stdout and stderr."""
        self.process.wait(timeout)
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    def stop(self) -> None:
        """Interrupt (so it stops its own children), then kill if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


Launch = Callable[..., Demo]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Launch]:
    """Starts `swarmtune demo --workdir DIR` with the small settings; a demo a failed test left running is
    interrupted (so it stops its own children) and then killed."""
    started: list[Demo] = []

    def launch(workdir: Path, *args: str) -> Demo:
        command = [sys.executable, "-m", "swarmtune", "demo", "--workdir", str(workdir), *SMALL, *args]
        out, err = tmp_path / f"demo-{len(started)}.out", tmp_path / f"demo-{len(started)}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            started.append(Demo(subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr), out, err))
        return started[-1]

    yield launch
    for running in started:
        running.stop()


def descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc (children, grandchildren...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it ended meanwhile
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_iterations(workdir: Path, demo: Demo, count: int) -> None:
    """Until the coordinator has closed `count` iterations (its JSON log says so)."""
    log = workdir / "coordinator.log"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and demo.process.poll() is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count('"event": "iteration closed"') >= count:
            return
        time.sleep(0.2)
    demo.process.kill()
    pytest.fail(f"the demo closed fewer than {count} iterations (exit {demo.process.wait()}):\n{demo.finish(0)[1][-3000:]}")


def test_default_job_is_the_example_file() -> None:
    text = (ROOT / "examples" / "demo.toml").read_text()
    assert DemoJob().toml() == text
    assert load_job_spec(ROOT / "examples" / "demo.toml").retention_task == "demo-reverse"


def test_flags_change_the_job() -> None:
    job = DemoJob(iterations=7, population=12, prompts=5, seed=3, alpha=0.02, anchored_decay=0.001, retention_every=2)
    spec = parse_job_spec(job.toml().encode())
    assert (spec.iterations, spec.population, spec.prompts_per_iteration, spec.job_seed) == (7, 12, 5, 3)
    assert (spec.alpha, spec.anchored_decay, spec.retention_every) == (0.02, 0.001, 2)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_a_rerun_resumes(tmp_path: Path, demo: Launch) -> None:
    workdir, summary_file = tmp_path / "work", tmp_path / "summary.json"
    running = demo(workdir)
    wait_for_iterations(workdir, running, 1)
    children = descendants(running.process.pid)
    assert len(children) >= 4, "a coordinator, its Redis and two workers"
    running.process.send_signal(signal.SIGINT)
    _, err = running.finish(STOP_TIMEOUT_S)
    assert running.process.returncode == 130, err[-3000:]
    assert "the ledger" in err and f"--workdir {workdir}" in err
    assert not [pid for pid in children if alive(pid)]
    with open_store(None, workdir / "redis") as store:
        report = ledger.verify_chain(list(store.read("demo")))
    assert report.problem is None and 1 <= report.kinds.get("iteration", 0) < ITERATIONS

    rerun = demo(workdir, "--summary", str(summary_file), "--json")
    out, err = rerun.finish(RUN_TIMEOUT_S)
    assert rerun.process.returncode == 0, err[-3000:]
    summary = json.loads(summary_file.read_text())
    assert json.loads(out) == summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["audit_ok"] is True and summary["audit_problem"] is None
    assert (summary["iterations"], summary["workers"]) == (ITERATIONS, 2)
    assert [point["iteration"] for point in summary["curve"]] == [0, 5, 10, 15, 20]
    assert 0.0 <= summary["task_accuracy_after"] <= 1.0 and 0.0 <= summary["retention_after"] <= 1.0
    assert Path(summary["plot"]).read_bytes().startswith(b"\x89PNG")
    assert ledger.verify_chain(ledgerfile.read(Path(summary["ledger"]))).problem is None


def _status(closed: int) -> JobStatus:
    summary = IterationSummary(closed, 8, 8, 0.5, 0.25, 0.75, None, {"demo-reverse": 0.99}, (), 0.4, 0.1, 0.5)
    return JobStatus(
        source="coordinator", job_id="demo", state="running", iteration=closed + 1, iterations_total=10, closed=closed,
        population=8, settled=0, head_index=closed, head_hash=b"", recent=(summary,), workers=(), rejects={}, alerts=(),
    )


def test_progress_line_shows_every_figure() -> None:
    line = progress_line(_status(5), Measurement(5, 0.524, 0.99), 61.0)
    assert line.startswith("it  5/10 [##########..........]")
    for part in ("reward 0.500 (max 0.750)", "held-out 52.4% @5", "retention demo-reverse 99.0%", "2.00 it/s", "1:01"):
        assert part in line


def test_display_without_a_terminal_prints_lines_sparingly() -> None:
    stream = io.StringIO()
    display = Display(stream)
    display.show("first")
    display.show("skipped")
    display.show("last", final=True)
    assert stream.getvalue().splitlines() == ["first", "last"]

