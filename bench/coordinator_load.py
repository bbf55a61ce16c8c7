"""Coordinator load: simulated workers (real keys, real signatures, instant rewards) against a real
coordinator process and Redis on loopback. For 10, 100 and 1,000 workers: iteration close latency
(last needed result accepted -> iteration entry appended and broadcast, as the coordinator measures
it) p50/p99, and signed results ingested per second (results settled / time from opening an
iteration to its last needed result). Last line: one JSON object.

Usage: python bench/coordinator_load.py   (no arguments; < 10 minutes on 2 cores)
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from swarmtune import identity  # noqa: E402
from swarmtune.embedded_redis import EmbeddedRedis  # noqa: E402
from swarmtune.store import connect  # noqa: E402
from swarmtune.wire import service_pb2 as pb  # noqa: E402
from swarmtune.wire.service_pb2_grpc import CoordinatorStub  # noqa: E402
from tests.support.coordinator_harness import CoordinatorProcess, SimWorker, channel, spec_text, write_genesis  # noqa: E402

WORKER_COUNTS = (10, 100, 1000)
CLIENT_PROCESSES = 2  # 2 cores: a few processes with many asyncio workers each
WORKERS_PER_CHANNEL = 50  # HTTP/2 connections shared by simulated workers (streams multiplex)
# Members per worker and iteration (population = workers x this), as a worker's capacity: 1,000
# workers get one member each (a 1,000-member population). bench/population.py runs the large ones.
MEMBERS_PER_WORKER = {10: 16, 100: 16, 1000: 1}
WARMUP_ITERATIONS = 2  # the first iterations open while workers are still connecting
ITERATIONS = {10: 40, 100: 30, 1000: 20}
GOALS = {"max_workers_held": 1000, "close_p99_ms": 250.0, "results_per_s": 3000.0}


def client(address: str, job_id: str, pems: list[bytes], capacity: int, ready: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One client process: its share of the workers, each joining, subscribing and answering."""
    asyncio.run(_client(address, job_id, pems, capacity, ready))


async def _client(address: str, job_id: str, pems: list[bytes], capacity: int, ready: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    channels = [channel(address) for _ in range(math.ceil(len(pems) / WORKERS_PER_CHANNEL))]
    workers = []
    for i, pem in enumerate(pems):
        key = load_pem_private_key(pem, password=None)
        assert isinstance(key, Ed25519PrivateKey)
        stub = CoordinatorStub(channels[i // WORKERS_PER_CHANNEL])
        workers.append(SimWorker(stub, job_id, key=key, capacity=capacity, keep_entries=False, member_reward=member_reward))
    for start in range(0, len(workers), 100):  # join in waves: the coordinator verifies each proof
        await asyncio.gather(*(joined(w) for w in workers[start : start + 100]))
    for w in workers:
        w.start()
    ready.put(len(workers))
    await asyncio.gather(*(w.closed.wait() for w in workers))
    for chan in channels:
        await chan.close()


def member_reward(member: int) -> float:
    """What a simulated worker reports: instant, and varied enough that shaping sorts real values."""
    return (member * 7919 % 1000) / 1000


async def joined(worker: SimWorker, attempts: int = 5) -> None:
    """Join, again after a call a busy coordinator shed (CANCELLED) or could not take (UNAVAILABLE)."""
    for attempt in range(1, attempts + 1):
        try:
            await worker.join()
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE) or attempt == attempts:
                raise
            await asyncio.sleep(0.5 * attempt)


async def status(address: str) -> pb.JobStatus:
    async with channel(address) as chan:
        return await CoordinatorStub(chan).Status(pb.StatusRequest())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class LoadJob:
    """A job for a coordinator process: its spec and key files, its workers' keys; genesis written."""

    job_id: str
    keys: list[Ed25519PrivateKey]
    coordinator_key: Ed25519PrivateKey
    key_file: Path
    job_file: Path

    @property
    def public(self) -> tuple[bytes, ...]:
        return tuple(identity.public_key_bytes(k) for k in self.keys)


def load_job(work: Path, redis_url: str, job_id: str, workers: int, population: int, iterations: int) -> LoadJob:
    keys = [identity.generate_key() for _ in range(workers)]
    coordinator_key = identity.generate_key()
    job = LoadJob(job_id, keys, coordinator_key, work / f"{job_id}.key", work / f"{job_id}.toml")
    identity.save_private_key(coordinator_key, job.key_file)
    job.job_file.write_bytes(spec_text(job_id, population=population, iterations=iterations, deadline=120))
    write_genesis(connect(redis_url), job.job_file.read_bytes(), job_id, coordinator_key, job.public)
    return job


def drive(
    coordinator: CoordinatorProcess, address: str, job_id: str, keys: list[Ed25519PrivateKey], members: int, poll_s: float
) -> tuple[int, int, pb.JobStatus]:
    """The simulated workers, in CLIENT_PROCESSES processes, until the job finishes; then the coordinator
    stops. (Workers that joined, the most connected at once, the final status.) Status is asked every
    `poll_s` and as soon as a client process ends (its workers' streams end with the job): a status of
    1,000 workers costs the coordinator's loop tens of ms, which a short poll would charge to the figures."""
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    pems = [identity.private_key_pem(k) for k in keys]
    shares = [pems[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
    clients = [context.Process(target=client, args=(address, job_id, share, members, ready)) for share in shares if share]
    try:
        for process in clients:
            process.start()
        held = sum(ready.get(timeout=300) for _ in clients)
        peak = 0
        while True:
            report = asyncio.run(status(address))
            peak = max(peak, sum(w.connected for w in report.workers))
            if report.state == pb.JobStatus.FINISHED:
                break
            multiprocessing.connection.wait([process.sentinel for process in clients], timeout=poll_s)
        for process in clients:
            process.join(120)
    finally:
        coordinator.stop(30)
        for process in clients:
            if process.is_alive():
                process.kill()
    return held, peak, report


def run_size(workers: int, redis_url: str, work: Path) -> dict[str, float]:
    members = MEMBERS_PER_WORKER[workers]
    job = load_job(work, redis_url, f"load-{workers}", workers, workers * members, ITERATIONS[workers])
    coordinator = CoordinatorProcess(job.job_file, redis_url, job.key_file, job.public, "--serve-after")
    address = f"127.0.0.1:{coordinator.start()}"
    started = time.monotonic()
    poll_s = 2.0 if workers > 100 else 0.2  # status of 1,000 workers is not free: poll gently
    held, peak, report = drive(coordinator, address, job.job_id, job.keys, members, poll_s)
    measured = [s for s in report.recent if s.iteration > WARMUP_ITERATIONS]
    closes = [s.overhead_s * 1000 for s in measured]
    results = sum(s.rewarded for s in measured)
    evaluation = sum(s.evaluation_s for s in measured)
    row = {
        "workers": workers,
        "members_per_worker": members,
        "held": min(held, peak),
        "iterations": len(measured),
        "close_p50_ms": round(statistics.median(closes), 1),
        "close_p99_ms": round(percentile(closes, 0.99), 1),
        "results_per_s": round(results / evaluation, 1) if evaluation else 0.0,
        "iteration_wall_p50_ms": round(statistics.median(s.wall_s * 1000 for s in measured), 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def machine() -> dict[str, object]:
    """This machine's other load (shared cores make every figure slower): 1/5/15-minute averages."""
    return {"load_average": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="swarmtune-load-") as tmp, EmbeddedRedis(Path(tmp) / "redis") as redis:
        rows = [run_size(n, redis.url, Path(tmp)) for n in WORKER_COUNTS]
    full = [r for r in rows if r["held"] == r["workers"]]
    largest = max(full, key=lambda r: r["workers"]) if full else rows[0]
    summary = {
        "max_workers_held": int(largest["held"]),
        "close_p99_ms": largest["close_p99_ms"],
        "results_per_s": max(r["results_per_s"] for r in rows),  # the best sustained rate; each size below
        "by_workers": {str(r["workers"]): r for r in rows},
        "goals": GOALS,
        **machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
