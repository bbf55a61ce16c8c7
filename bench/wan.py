"""WAN bench: what a wide-area link between workers and the coordinator costs each iteration.

Run with no arguments, as root (network namespaces), in a few minutes. Progress goes to stderr; the
last line on stdout is one JSON object (with a "skipped" reason where namespaces cannot be made).

The job is examples/smoke.toml (builtin:tiny, population 8, 32 prompts, 8 tokens, an attestation
every iteration) with more iterations, a coordinator and 2 workers (capacity 4 each, one torch
thread), run twice:
  loopback   every process on 127.0.0.1 of this machine's own network namespace (the reference);
  wan        the coordinator in a network namespace and each worker in one of its own, each worker's
             link to the coordinator a private /30 (10.200.K.0/30: coordinator .1, worker .2) that
             exists only between the namespaces this bench creates, shaped in both directions like
             `tc qdisc add dev X root netem delay 75ms 10ms loss 1% rate 20mbit` on each end:
             150 ms RTT with 20 ms jitter, 1% loss each way, 20 Mbit/s.
The shaping is `tc netem` on a veth pair where the kernel has sch_netem. Where it does not (some VM
kernels ship without it), the bench shapes the link itself: a TAP interface in each namespace of the
link and this process between them, holding every Ethernet frame for its delay (uniform jitter, no
reordering), dropping 1% each way and serialising at 20 Mbit/s; real TCP, TLS-free gRPC and HTTP/2 run
over it unchanged. "shaper" in the JSON says which; `link_rtt_ms` is the TCP connect time measured
across the link before the job (goal: about 150).

Figures (wall per iteration = coordinator's "iteration closed" to the next one; the first WARMUP
iterations, joining and first-call allocations, are left out):
  wan_overhead_ms_per_iteration   mean wall per iteration on the WAN minus on loopback
  rtts_per_iteration              that overhead in nominal RTTs (150 ms); goal <= 2
  path_ms                         medians of where an iteration's time goes, on each run:
                                  `announce` (iteration t-1 closed -> the last worker to get
                                  `opened` t logs it), `evaluate` (that -> the last result
                                  evaluated), `submit_close` (last result evaluated -> t closed)
  path_extra_ms / _rtts           the WAN's extra time on each leg. The protocol's floor is 0.5 RTT on
                                  `announce` (entry and opening out) and 0.5 on `submit_close` (the
                                  last result back): 1 RTT an iteration
All timestamps come from one clock (one machine). Every process runs on this machine; nothing is sent
to any other address.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "smoke.toml"
ITERATIONS = 30
WARMUP = 5
WORKERS = 2
CAPACITY = 4
TIMEOUT_S = 240.0
PORT = 7070

ONE_WAY_S = 0.075  # 150 ms RTT
JITTER_S = 0.010  # ± per direction: 20 ms of RTT jitter
LOSS = 0.01  # each direction
RATE_BPS = 20e6
QUEUE_LIMIT = 1000  # frames per direction (netem's default limit)
NETEM = ["delay", "75ms", "10ms", "loss", "1%", "rate", "20mbit"]
NOMINAL_RTT_MS = 2000 * ONE_WAY_S

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Skip(Exception):
    """This machine cannot run the WAN half: the reason goes into the JSON line."""


def bench_spec(iterations: int) -> bytes:
    text = SMOKE.read_text()
    text, ids = re.subn(r'(?m)^id = ".*"$', 'id = "wan-bench"', text)
    text, counts = re.subn(r"(?m)^iterations = \d+", f"iterations = {iterations}", text)
    if (ids, counts) != (1, 1):
        raise SystemExit(f"{SMOKE} no longer has one `id = ...` and one `iterations = ...` line; update this bench")
    return text.encode()


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


# ---- the network -------------------------------------------------------------------------------


class Shaper(threading.Thread):
    """Forwards Ethernet frames between TAP pairs, each way delayed, thinned and rate-limited like netem."""

    def __init__(self, seed: int = 2026) -> None:
        super().__init__(name="wan-shaper", daemon=True)
        self.random = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.queue: list[tuple[float, int, int, bytes]] = []  # (deliver at, sequence, out fd, frame)
        self.sequence = 0
        self.directions: dict[int, dict[str, Any]] = {}  # in fd -> its direction's state
        self.fds: list[int] = []
        self.stopping = threading.Event()
        self.frames = {"forwarded": 0, "dropped": 0}

    def add_pair(self, a: int, b: int) -> None:
        for into, out in ((a, b), (b, a)):
            self.directions[into] = {"out": out, "free_at": 0.0, "last": 0.0, "queued": 0}
            self.selector.register(into, selectors.EVENT_READ)
        self.fds += [a, b]

    def _take(self, fd: int, frame: bytes, now: float) -> None:
        way = self.directions[fd]
        if self.random.random() < LOSS or way["queued"] >= QUEUE_LIMIT:
            self.frames["dropped"] += 1
            return
        departs = max(now, way["free_at"]) + len(frame) * 8 / RATE_BPS
        way["free_at"] = departs
        deliver = max(departs + ONE_WAY_S + self.random.uniform(-JITTER_S, JITTER_S), way["last"])
        way["last"] = deliver
        way["queued"] += 1
        self.sequence += 1
        heapq.heappush(self.queue, (deliver, self.sequence, fd, frame))

    def run(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic()
            while self.queue and self.queue[0][0] <= now:
                _, _, into, frame = heapq.heappop(self.queue)
                way = self.directions[into]
                way["queued"] -= 1
                try:
                    os.write(way["out"], frame)
                    self.frames["forwarded"] += 1
                except OSError:
                    self.frames["dropped"] += 1
            wait = min(0.05, self.queue[0][0] - now) if self.queue else 0.05
            for key, _ in self.selector.select(max(0.0, wait)):
                fd = int(key.fd)  # type: ignore[arg-type]
                while True:
                    try:
                        frame = os.read(fd, 65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    self._take(fd, frame, time.monotonic())

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(5)
        for fd in self.fds:
            os.close(fd)


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Network:
    """The namespaces, links and addresses this bench makes (and removes, whatever happens)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.coordinator_ns = f"swtwan{tag}c"
        self.worker_ns = [f"swtwan{tag}w{k}" for k in range(WORKERS)]
        self.made: list[str] = []
        self.shaper: Shaper | None = None
        self.kind = ""

    @staticmethod
    def coordinator_address(k: int) -> str:
        return f"10.200.{k + 1}.1"

    @staticmethod
    def worker_address(k: int) -> str:
        return f"10.200.{k + 1}.2"

    def _netns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _address(self, ns: str, device: str, address: str) -> None:
        sh("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", device)
        sh("ip", "-n", ns, "link", "set", device, "up")

    def build(self) -> None:
        if os.geteuid() != 0:
            raise Skip("network namespaces need root (run as root, or in a container with CAP_NET_ADMIN and CAP_SYS_ADMIN)")
        if shutil.which("ip") is None:
            raise Skip("the `ip` command (iproute2) is missing: apt-get install -y iproute2")
        try:
            self._netns(self.coordinator_ns)
            for name in self.worker_ns:
                self._netns(name)
        except (RuntimeError, OSError) as exc:
            raise Skip(f"cannot make network namespaces here ({exc})") from None
        try:
            if self._netem_links():
                self.kind = "tc netem on veth pairs"
            else:
                self._tap_links()
                self.kind = "userspace (this kernel has no sch_netem): TAP pairs and this process"
        except (RuntimeError, OSError) as exc:
            raise Skip(f"cannot make the links between the namespaces ({exc})") from None

    def _netem_links(self) -> bool:
        """veth pairs with netem on both ends; False (nothing left behind) where netem is missing."""
        if shutil.which("tc") is None:
            return False
        for k, ns in enumerate(self.worker_ns):
            near, far = f"swtc{k}", f"swtw{k}"
            sh("ip", "link", "add", near, "netns", self.coordinator_ns, "type", "veth", "peer", "name", far, "netns", ns)
            self._address(self.coordinator_ns, near, self.coordinator_address(k))
            self._address(ns, far, self.worker_address(k))
            for where, device in ((self.coordinator_ns, near), (ns, far)):
                shaped = sh("tc", "-n", where, "qdisc", "add", "dev", device, "root", "netem", *NETEM, check=False)
                if shaped.returncode != 0:
                    log(f"tc netem is not available here ({shaped.stderr.strip()}); shaping in userspace instead")
                    for j in range(k + 1):
                        sh("ip", "-n", self.coordinator_ns, "link", "del", f"swtc{j}", check=False)
                    return False
        return True

    def _tap_links(self) -> None:
        if not Path("/dev/net/tun").exists():
            raise Skip("this kernel has no sch_netem and there is no /dev/net/tun to shape the links in userspace")
        self.shaper = Shaper()
        for k, ns in enumerate(self.worker_ns):
            near, far = f"swtc{k}", f"swtw{k}"
            try:
                a, b = open_tap(near), open_tap(far)
            except OSError as exc:
                raise Skip(f"cannot make TAP interfaces ({exc})") from None
            self.shaper.add_pair(a, b)
            sh("ip", "link", "set", near, "netns", self.coordinator_ns)
            sh("ip", "link", "set", far, "netns", ns)
            self._address(self.coordinator_ns, near, self.coordinator_address(k))
            self._address(ns, far, self.worker_address(k))
        self.shaper.start()

    def teardown(self) -> None:
        if self.shaper is not None:
            self.shaper.stop()
        for name in reversed(self.made):
            sh("ip", "netns", "del", name, check=False)
        self.made.clear()

    def in_ns(self, ns: str, action: Callable[[], Any]) -> Any:
        """`action()` on a thread that entered network namespace `ns` (sockets it makes live there)."""
        result: dict[str, Any] = {}

        def enter() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/var/run/netns/{ns}") as handle:
                    if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({ns})")
                result["value"] = action()
            except Exception as exc:  # noqa: BLE001 - carried to the caller
                result["error"] = exc

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join(60)
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def link_rtt_ms(self, k: int, probes: int = 10) -> float:
        """Median TCP connect time from worker k's namespace to a listener across its link."""
        listener: socket.socket = self.in_ns(self.coordinator_ns, lambda: socket.create_server((self.coordinator_address(k), 0)))
        port = listener.getsockname()[1]
        accepting = threading.Event()

        def accept_all() -> None:
            listener.settimeout(0.5)
            while not accepting.is_set():
                try:
                    listener.accept()[0].close()
                except OSError:
                    continue

        acceptor = threading.Thread(target=accept_all, daemon=True)
        acceptor.start()

        def connect_times() -> list[float]:
            times = []
            for _ in range(probes):
                started = time.perf_counter()
                with socket.create_connection((self.coordinator_address(k), port), timeout=10):
                    times.append(time.perf_counter() - started)
            return times

        try:
            times = self.in_ns(self.worker_ns[k], connect_times)
        finally:
            accepting.set()
            acceptor.join(2)
            listener.close()
        return 1000 * statistics.median(times)


# ---- the job -----------------------------------------------------------------------------------


def events(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith('{"ts'):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def run_job(work: Path, spec_bytes: bytes, model_dir: Path, network: Network | None) -> dict[str, Any]:
    """Coordinator and workers to completion (in the namespaces with `network`); their events."""
    from swarmtune import identity

    work.mkdir(parents=True)
    spec_path = work / "job.toml"
    spec_path.write_bytes(spec_bytes)
    coordinator_key = work / "coordinator.key"
    worker_keys = [work / f"worker{k}.key" for k in range(WORKERS)]
    for path in (coordinator_key, *worker_keys):
        identity.save_private_key(identity.generate_key(), path)
    swarmtune = [sys.executable, "-m", "swarmtune"]

    def inside(ns: str | None) -> list[str]:
        return ["ip", "netns", "exec", ns] if ns else []

    if network is None:
        port = free_port()
        listen, targets, coordinator_ns, worker_ns = f"127.0.0.1:{port}", [f"127.0.0.1:{port}"] * WORKERS, None, [None] * WORKERS
    else:
        listen = f"0.0.0.0:{PORT}"
        targets = [f"{network.coordinator_address(k)}:{PORT}" for k in range(WORKERS)]
        coordinator_ns, worker_ns = network.coordinator_ns, list(network.worker_ns)
    logs = [work / "coordinator.log", *(work / f"worker{k}.log" for k in range(WORKERS))]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with logs[0].open("w") as out:
            processes.append(subprocess.Popen(
                [*inside(coordinator_ns), *swarmtune, "coordinator", "--job", str(spec_path), "--data-dir", str(work / "redis"),
                 "--key", str(coordinator_key), "--listen", listen, "--admit", *map(str, worker_keys),
                 "--min-workers", str(WORKERS), "--log-json"],
                stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT, start_new_session=True,
            ))  # fmt: skip
        for k in range(WORKERS):
            with logs[k + 1].open("w") as out:
                processes.append(subprocess.Popen(
                    [*inside(worker_ns[k]), *swarmtune, "worker", "--coordinator", targets[k], "--key", str(worker_keys[k]),
                     "--model", str(model_dir), "--capacity", str(CAPACITY), "--log-json"],
                    stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT, start_new_session=True,
                ))  # fmt: skip
        deadline = time.monotonic() + TIMEOUT_S
        for process, path in zip(processes, logs):
            left = max(1.0, deadline - time.monotonic())
            try:
                code = process.wait(left)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs)
                raise SystemExit(f"the job did not finish ({path.name}: exit {code}):\n{tails}")
    finally:  # each child leads its own process group: the coordinator's embedded redis-server goes too
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return {"coordinator": events(logs[0]), "workers": [events(p) for p in logs[1:]]}


def per_iteration(run: dict[str, Any]) -> list[dict[str, float]]:
    closed = {e["iteration"]: e["ts"] for e in run["coordinator"] if e["event"] == "iteration closed"}
    rows = []
    for t in range(WARMUP + 1, ITERATIONS + 1):
        opened = [e["ts"] for w in run["workers"] for e in w if e["event"] == "opened" and e["iteration"] == t]
        evaluated = [e["ts"] for w in run["workers"] for e in w if e["event"] == "evaluated" and e["iteration"] == t]
        if not opened or not evaluated or t not in closed or t - 1 not in closed:
            raise SystemExit(f"iteration {t} left no opened/evaluated/closed events; the logs' format changed?")
        announced, last_result = max(opened), max(evaluated)
        rows.append({
            "wall": closed[t] - closed[t - 1],
            "announce": announced - closed[t - 1],
            "evaluate": last_result - announced,
            "submit_close": closed[t] - last_result,
        })  # fmt: skip
    return rows


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "wall_ms_mean": round(1000 * statistics.fmean(r["wall"] for r in rows), 1),
        "wall_ms_median": round(1000 * statistics.median(r["wall"] for r in rows), 1),
        "path_ms": {key: round(1000 * statistics.median(r[key] for r in rows), 1) for key in ("announce", "evaluate", "submit_close")},
    }


def main() -> None:
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # still remove the namespaces
    from swarmtune.jobspec import parse_job_spec
    from swarmtune.models import resolve_model

    spec_bytes = bench_spec(ITERATIONS)
    spec = parse_job_spec(spec_bytes)
    base: dict[str, Any] = {
        "job": SMOKE.name, "iterations_measured": ITERATIONS - WARMUP, "workers": WORKERS, "population": spec.population,
        "link": {"rtt_ms": NOMINAL_RTT_MS, "jitter_ms": 2000 * JITTER_S, "loss_each_way": LOSS, "rate_mbit": RATE_BPS / 1e6},
    }  # fmt: skip
    network = Network()
    with ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="swarmtune-wan-") as tmp:
        cleanup.callback(network.teardown)
        try:
            network.build()
        except Skip as exc:
            log(f"skipped: {exc}")
            print(json.dumps({**base, "skipped": str(exc)}))
            return
        log(f"links: {network.kind}")
        rtts = [network.link_rtt_ms(k) for k in range(WORKERS)]
        log(f"measured link RTT (TCP connect, median of 10): {', '.join(f'{r:.1f} ms' for r in rtts)}")
        log(f"resolving {spec.model}")
        model_dir = resolve_model(spec.model)
        log(f"loopback: {ITERATIONS} iterations of {SMOKE.name} with {WORKERS} workers")
        loopback = summary(per_iteration(run_job(Path(tmp) / "loopback", spec_bytes, model_dir, None)))
        log(f"loopback: {loopback}")
        log(f"wan: the same job with each worker behind its shaped link ({network.kind})")
        wan = summary(per_iteration(run_job(Path(tmp) / "wan", spec_bytes, model_dir, network)))
        log(f"wan: {wan}")
        frames = dict(network.shaper.frames) if network.shaper is not None else None
    overhead = wan["wall_ms_mean"] - loopback["wall_ms_mean"]
    result = {
        "wan_overhead_ms_per_iteration": round(overhead, 1),
        "rtts_per_iteration": round(overhead / NOMINAL_RTT_MS, 2),
        "goal_rtts": 2,
        "shaper": network.kind,
        "link_rtt_ms": [round(r, 1) for r in rtts],
        "loopback": loopback,
        "wan": wan,
        "path_extra_ms": {key: round(wan["path_ms"][key] - loopback["path_ms"][key], 1) for key in loopback["path_ms"]},
        "path_extra_rtts": {key: round((wan["path_ms"][key] - loopback["path_ms"][key]) / NOMINAL_RTT_MS, 2) for key in loopback["path_ms"]},
        **base,
        "frames": frames,
        "wall_s": round(time.monotonic() - started, 1),
    }
    log(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
