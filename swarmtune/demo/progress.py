"""The demo's live progress line: the coordinator's status next to the demo's own held-out measurements."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from swarmtune.client.status import IterationSummary, JobStatus
    from swarmtune.demo.follow import Measurement
    from swarmtune.jobspec import JobSpec

BAR_WIDTH = 20
STATUS_TIMEOUT_S = 10.0
RATE_WINDOW = 10  # iterations the iterations/s figure averages over
PLAIN_EVERY_S = 15.0  # without a terminal, one line this often (logs stay short)


def fetch_status(stub: Any, spec: JobSpec) -> JobStatus:
    """The coordinator's live status (its Status RPC), in the client's form."""
    from swarmtune.client.status import status_from_message
    from swarmtune.wire import service_pb2 as pb

    return status_from_message(stub.Status(pb.StatusRequest(), timeout=STATUS_TIMEOUT_S), spec)


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = round(width * min(1.0, done / total)) if total else 0
    return "#" * filled + "." * (width - filled)


def rate(recent: tuple[IterationSummary, ...]) -> float | None:
    """Iterations per second over the last closes this coordinator timed."""
    walls = [s.wall_s for s in recent[-RATE_WINDOW:] if s.wall_s]
    return len(walls) / sum(walls) if walls else None


def retention(recent: tuple[IterationSummary, ...]) -> str:
    """The newest signed retention figure(s) the ledger recorded."""
    for summary in reversed(recent):
        if summary.retention:
            return " ".join(f"{name} {value:.1%}" for name, value in summary.retention.items())
    return "-"


def progress_line(status: JobStatus, measured: Measurement, elapsed_s: float) -> str:
    """`it 37/100 [####....] reward 0.61 (max 0.69) · held-out 52.4% @30 · retention demo-reverse 99.6% · 1.9 it/s · 0:41`"""
    last = status.recent[-1] if status.recent else None
    reward = f"reward {last.reward_mean:.3f} (max {last.reward_max:.3f})" if last and last.reward_mean is not None else "reward -"
    speed = rate(status.recent)
    minutes, seconds = divmod(int(elapsed_s), 60)
    parts = [
        f"it {status.closed:>{len(str(status.iterations_total))}}/{status.iterations_total} [{bar(status.closed, status.iterations_total)}]",
        reward,
        f"held-out {measured.task_accuracy:.1%} @{measured.iteration}",
        f"retention {retention(status.recent)}",
        f"{speed:.2f} it/s" if speed else "- it/s",
        f"{minutes}:{seconds:02d}",
    ]
    return " · ".join(parts)


@dataclass
class Display:
    """Rewrites one line on a terminal; elsewhere (logs, CI) prints a line now and then."""

    stream: TextIO
    last_plain: float = field(default=-PLAIN_EVERY_S)
    shown: bool = False

    def show(self, line: str, final: bool = False) -> None:
        if self.stream.isatty():
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + line[:width].ljust(width))
            self.shown = True
        elif final or time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
            self.stream.write(line + "\n")
            self.last_plain = time.monotonic()
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message on its own line, leaving the progress line intact below it."""
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.shown = False
