"""A fork server for multi-process tests: imports torch and transformers once, then forks real processes.

On 2 cores, importing torch + transformers costs ~9 CPU-seconds per process; the end-to-end and fault
tests start dozens of processes. Each child here is a real OS process (own pid, own memory, killed by
signals, talking to the others only over loopback) that skips the import cost. grpc is deliberately
not imported before forking: its threads do not survive fork.

Server: `python -m tests.support.zygote` reads JSON requests {"module", "args", "log"} on stdin and answers
{"pid"}; it reaps children and reports {"exit": pid, "status"}. Client: `Zygote`.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

# What every swarmtune process would import anyway (no grpc: see above).
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "safetensors.torch",
    "swarmtune.models",
    "swarmtune.backends.hf",
    "swarmtune.replay",
    "swarmtune.tasks.registry",
)
REAP_INTERVAL_S = 0.05


def _exec_child(request: dict[str, Any]) -> None:
    """In the forked child: become `python -m module args...` with output to the log file."""
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    sys.argv = [request["module"], *request["args"]]
    status = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _reap(out: IO[str], children: set[int]) -> None:
    """Collect exited children and report their status."""
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        children.discard(pid)
        out.write(json.dumps({"exit": pid, "status": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


def serve() -> None:
    for module in PRELOAD:
        __import__(module)
    out = sys.stdout
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    children: set[int] = set()  # forked and not yet reaped: the only pids safe to signal
    try:
        while True:
            readable, _, _ = select.select([sys.stdin], [], [], REAP_INTERVAL_S)
            _reap(out, children)
            if not readable:
                continue
            line = sys.stdin.readline()
            if not line:
                return  # the test process is gone
            request = json.loads(line)
            out.flush()
            pid = os.fork()
            if pid == 0:
                _exec_child(request)
            children.add(pid)
            out.write(json.dumps({"pid": pid}) + "\n")
            out.flush()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Child:
    """A forked process, with the Popen-like calls the tests use."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid

    def poll(self) -> int | None:
        return self.zygote.status(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        status = self.zygote.wait(self.pid, timeout)
        if status is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return status

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # never signal a pid that exited (and may have been reused)
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """Client side: starts the server and forks children through it."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd, env=env, text=True
        )
        self._exits: dict[int, int] = {}
        self._replies: list[int] = []
        self._changed = threading.Condition()
        assert self._process.stdout is not None
        ready = self._process.stdout.readline()
        if not ready:
            raise RuntimeError("the zygote failed to start; run `python -m tests.support.zygote` to see why")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            message = json.loads(line)
            with self._changed:
                if "pid" in message:
                    self._replies.append(message["pid"])
                else:
                    self._exits[message["exit"]] = message["status"]
                self._changed.notify_all()

    def spawn(self, module: str, args: list[str], log: Path) -> Child:
        assert self._process.stdin is not None
        with self._changed:
            self._process.stdin.write(json.dumps({"module": module, "args": args, "log": str(log)}) + "\n")
            self._process.stdin.flush()
            self._changed.wait_for(lambda: bool(self._replies), timeout=30)
            return Child(self, self._replies.pop(0))

    def status(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits, timeout=timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(30)


if __name__ == "__main__":
    serve()
