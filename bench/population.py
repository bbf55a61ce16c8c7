"""Population scale: a real coordinator process and Redis on loopback, simulated workers (real keys,
real batch signatures, instant rewards) at population 16,384 from 256 workers and 1,000 workers x 16
members. Per size: close latency p99 (last needed result -> entry appended), member results taken
per second, ledger bytes per member, a worker's receive + verify of an iteration digest and its exact
update of the demo model at that population, and the audit's members per second (no replay).
Last line: one JSON object (the 16,384 size's figures at the top, every size under by_size).

Usage: python bench/population.py   (no arguments; < 10 minutes on 2 cores)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmtune import entries, ledger  # noqa: E402
from swarmtune.client.audit import audit  # noqa: E402
from swarmtune.digest import advance_digest, digest_of, seal_digest  # noqa: E402
from swarmtune.embedded_redis import EmbeddedRedis  # noqa: E402
from swarmtune.jobspec import parse_job_spec  # noqa: E402
from swarmtune.models import load_model, resolve_model  # noqa: E402
from swarmtune.replay import Replica, replay_params  # noqa: E402
from swarmtune.state import build_plan, master_from_model  # noqa: E402
from swarmtune.store import connect  # noqa: E402
from swarmtune.wire import service_pb2 as pb  # noqa: E402
from tests.support.coordinator_harness import CoordinatorProcess  # noqa: E402

from bench.coordinator_load import drive, load_job, machine, percentile  # noqa: E402

SIZES = ((256, 64), (1000, 16))  # (workers, members per worker)
WARMUP_ITERATIONS = 2  # the first iterations warm up the coordinator and the clients
ITERATIONS = 10
APPLY_REPEATS = 3
# Status is asked when the clients end (the job finished); this poll only bounds a hung run's wait.
STATUS_POLL_S = 30.0
GOALS = {
    "close_p99_ms": 100.0,
    "member_results_per_s": 100_000.0,
    "ledger_bytes_per_member": 16.0,
    "worker_receive_verify_ms": 50.0,
    "audit_members_per_s": 200_000.0,
}


def demo_replica(population: int) -> Replica:
    """The demo job's model (builtin:tiny, low-rank noise) as a worker holds it, at this population."""
    demo = (ROOT / "examples" / "demo.toml").read_bytes().replace(b"population = 30", f"population = {population}".encode())
    spec = parse_job_spec(demo)
    model, _ = load_model(resolve_model(spec.model, None))
    state = master_from_model(model, build_plan(model, spec.noise_family, spec.lowrank_others))
    return Replica(replay_params(spec), state)


def worker_apply(stored: list[bytes], coordinator_key: Any, population: int) -> dict[str, float]:
    """What a live worker does with the last iteration: receive its digest announcement, verify it
    against its chain, apply the update exactly (median of APPLY_REPEATS); and, for comparison, the
    verification of the full entry (every batch signature) that an auditor or catching-up worker does."""
    last = max(i for i, data in enumerate(stored) if entries.read_header(data).kind == "iteration")
    walked = list(ledger.walk(stored[: last + 1]))  # the last entry with its coefficients, as the coordinator has it
    before = walked[-2][0]
    announcement = pb.Announcement(compact=pb.Compact(index=last, digest=seal_digest(coordinator_key, digest_of(walked[-1][1])))).SerializeToString()
    replica = demo_replica(population)
    receive, apply, full = [], [], []
    for _ in range(APPLY_REPEATS):
        started = time.perf_counter()
        compact = pb.Announcement.FromString(announcement).compact
        _, digest = advance_digest(before, compact.digest)
        received = time.perf_counter()
        replica.restore(digest.iteration - 1)
        replica.apply(digest.as_iteration())
        applied = time.perf_counter()
        ledger.advance(before, stored[last])
        receive.append((received - started) * 1000)
        apply.append((applied - received) * 1000)
        full.append((time.perf_counter() - applied) * 1000)
    return {
        "worker_receive_verify_ms": round(statistics.median(receive), 2),
        "worker_update_ms": round(statistics.median(apply), 1),
        "worker_apply_ms": round(statistics.median(r + a for r, a in zip(receive, apply)), 1),
        "full_entry_verify_ms": round(statistics.median(full), 1),
        "digest_bytes": len(announcement),
    }


def ledger_figures(stored: list[bytes], population: int) -> dict[str, float]:
    iteration_bytes = [len(data) for data in stored if entries.read_header(data).kind == "iteration"]
    started = time.perf_counter()
    report = audit(stored)
    audited = time.perf_counter() - started
    assert report.ok, report.problem
    return {
        "ledger_bytes_per_member": round(statistics.mean(iteration_bytes) / population, 2),
        "entry_bytes": round(statistics.mean(iteration_bytes)),
        "audit_members_per_s": round(len(iteration_bytes) * population / audited),
        "audit_s": round(audited, 2),
    }


def run_size(workers: int, members: int, redis_url: str, work: Path) -> dict[str, Any]:
    population = workers * members
    job = load_job(work, redis_url, f"population-{workers}x{members}", workers, population, ITERATIONS)
    # The first iteration opens once every worker is connected: opening it earlier would measure
    # re-assignment to workers as they trickle in, not the steady state.
    coordinator = CoordinatorProcess(job.job_file, redis_url, job.key_file, job.public, "--serve-after", "--min-workers", str(workers))
    address = f"127.0.0.1:{coordinator.start()}"
    started = time.monotonic()
    held, _, report = drive(coordinator, address, job.job_id, job.keys, members, STATUS_POLL_S)
    wall_s = time.monotonic() - started
    measured = [s for s in report.recent if s.iteration > WARMUP_ITERATIONS]
    closes = [s.overhead_s * 1000 for s in measured]
    evaluation = sum(s.evaluation_s for s in measured)
    stored = list(connect(redis_url).read(job.job_id))
    row: dict[str, Any] = {
        "population": population,
        "workers": workers,
        "held": held,
        "iterations": len(measured),
        "close_p50_ms": round(statistics.median(closes), 1),
        "close_p99_ms": round(percentile(closes, 0.99), 1),
        "member_results_per_s": round(sum(s.rewarded for s in measured) / evaluation) if evaluation else 0,
        "iteration_wall_p50_ms": round(statistics.median(s.wall_s * 1000 for s in measured), 1),
        **ledger_figures(stored, population),
        **worker_apply(stored, job.coordinator_key, population),
        "wall_s": round(wall_s, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="swarmtune-population-") as tmp, EmbeddedRedis(Path(tmp) / "redis") as redis:
        rows = [run_size(workers, members, redis.url, Path(tmp)) for workers, members in SIZES]
    headline = rows[0]
    keys = ("population", "workers", "close_p99_ms", "member_results_per_s", "ledger_bytes_per_member", "worker_apply_ms", "worker_receive_verify_ms", "audit_members_per_s")
    summary = {
        **{k: headline[k] for k in keys},
        "by_size": {f"{r['workers']}x{r['population'] // r['workers']}": r for r in rows},
        "goals": GOALS,
        **machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
