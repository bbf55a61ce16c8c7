"""Processes that tests start: `python -m MODULE` with output to a log file, read back as JSON-line events."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import pytest

from swarmtune.demo.cluster import child_env
from tests.support.zygote import Zygote

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.1

Event = dict[str, Any]


def parse_events(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut while being written
    return events


class Process(Protocol):
    """What tests do with a process: a `subprocess.Popen` or a `zygote.Child`."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, signum: int) -> None: ...

    def kill(self) -> None: ...


@dataclass
class Proc:
    """A started process, its combined output file, and its JSON-line events."""

    name: str
    popen: Process
    log: Path

    def text(self) -> str:
        """The output so far ("" until the child has opened its log)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str | None = None) -> list[Event]:
        return [e for e in parse_events(self.text()) if name is None or e.get("event") == name]

    def wait_for(self, name: str, timeout: float, where: Callable[[Event], bool] = lambda e: True) -> Event:
        """The first event `name` satisfying `where`, waiting for it; fails with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events(name) if where(e)]
            if found:
                return found[0]
            if self.popen.poll() is not None:
                break
            time.sleep(POLL_S)
        pytest.fail(f"{self.name}: no {name!r} event within {timeout}s (exit {self.popen.poll()}):\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL, unless it has ended, and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait(30)


def launch(name: str, module: str, args: list[str], log: Path, zygote: Zygote | None = None) -> Proc:
    """`python -m module args...` in a new process (forked by the zygote if any), output appended to `log`."""
    if zygote is not None:
        return Proc(name, zygote.spawn(module, args, log), log)
    with log.open("ab") as out:
        popen = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env())
    return Proc(name, popen, log)
