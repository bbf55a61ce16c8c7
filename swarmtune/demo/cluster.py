"""The demo's processes: a coordinator (owning its embedded Redis) and workers on loopback, stopped together."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from swarmtune import identity

WORKER_STOP_S = 40.0  # a worker finishes the batch it is evaluating, then sends it
COORDINATOR_STOP_S = 30.0  # gRPC grace, then its Redis flushes and exits
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class Child:
    """One started process: its name, handle and combined output log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"


@dataclass(frozen=True)
class Cluster:
    """The running demo: where its coordinator listens, its Redis data, and every child process."""

    address: str
    data_dir: Path
    coordinator: Child
    workers: tuple[Child, ...]

    def failure(self) -> str | None:
        """What went wrong, if a process ended that should still run (workers leave with exit 0 at the end)."""
        code = self.coordinator.process.poll()
        if code is not None:
            return f"the coordinator exited with code {code}; its log {self.coordinator.log} ends:\n{self.coordinator.tail()}"
        for worker in self.workers:
            code = worker.process.poll()
            if code:
                return f"{worker.name} exited with code {code}; its log {worker.log} ends:\n{worker.tail()}"
        return None


def child_env() -> dict[str, str]:
    """One compute thread per process (the workers share the machine's cores), no hub, no bars."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def free_port() -> int:
    """A loopback port free right now (the coordinator binds it a moment later)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def ensure_key(path: Path) -> bytes:
    """The public key of the key file at `path`, created on first use (a resumed demo keeps its keys)."""
    if not path.exists():
        identity.save_private_key(identity.generate_key(), path)
    return identity.public_key_bytes(identity.load_private_key(path))


def spawn(name: str, args: Sequence[str], workdir: Path) -> Child:
    """`swarmtune ARGS` as a child in its own session: a terminal's Ctrl-C reaches only the demo,
    which then stops its children in order; the session's group also holds the coordinator's Redis."""
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "swarmtune", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,
        )
    return Child(name, process, log)


def coordinator_args(workdir: Path, job_file: Path, address: str, admitted: Sequence[bytes]) -> list[str]:
    return [
        "coordinator", "--job", str(job_file), "--data-dir", str(workdir / "redis"),
        "--key", str(workdir / "coordinator.key"), "--listen", address, "--serve-after", "--log-json",
        "--min-workers", str(len(admitted)), "--admit", *(key.hex() for key in admitted),
    ]  # fmt: skip


def worker_args(address: str, key: Path, capacity: int) -> list[str]:
    return ["worker", "--coordinator", address, "--key", str(key), "--capacity", str(capacity), "--log-json"]


@contextlib.contextmanager
def running_cluster(workdir: Path, job_file: Path, workers: int, population: int) -> Iterator[Cluster]:
    """Start the coordinator and `workers` workers; on exit (Ctrl-C included) stop every one of them."""
    address = f"127.0.0.1:{free_port()}"
    keys = [workdir / f"worker-{n}.key" for n in range(1, workers + 1)]
    admitted = [ensure_key(path) for path in keys]
    # Each worker takes an equal share, so the first to join does not take the whole population.
    capacity = math.ceil(population / workers)
    children: list[Child] = []
    try:
        children.append(spawn("coordinator", coordinator_args(workdir, job_file, address, admitted), workdir))
        for n, key in enumerate(keys, 1):
            children.append(spawn(f"worker-{n}", worker_args(address, key, capacity), workdir))
        yield Cluster(address, workdir / "redis", children[0], tuple(children[1:]))
    finally:
        with sigint_ignored():
            stop_children(children[1:], WORKER_STOP_S)
            stop_children(children[:1], COORDINATOR_STOP_S)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut the shutdown short and leave children running."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_children(children: Sequence[Child], grace_s: float) -> None:
    """SIGTERM all (each drains and exits), wait up to grace_s, then SIGKILL whatever is left of each session."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The whole session: a coordinator killed mid-shutdown would otherwise leave its Redis behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()
