"""Colluding liars against a real coordinator (in-process, real Redis, real gRPC, real keys and signatures).

Simulated workers: honest ones report a deterministic reward per member after a short "evaluation",
colluding liars report the same fabricated reward (1.0) the instant a member is assigned. At 10%,
20% and 40% liars among the untrusted keys, without referees and with one referee and a 5% spot
check, over 100 iterations: the share of recorded rewards that are fabricated, honest and lying
keys revoked, iterations until the last liar was revoked, and the coordinator's added time per
iteration (draw, candidate order, spot checks and verdicts, timed on the same sizes). Last line: one
JSON object.

Usage: python bench/byzantine.py   (no arguments; a few minutes on 2 cores)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmtune import draw, entries, identity  # noqa: E402
from swarmtune.coordinator.server import ServerOptions, open_history, start  # noqa: E402
from swarmtune.embedded_redis import EmbeddedRedis  # noqa: E402
from swarmtune.batches import MemberResult  # noqa: E402
from swarmtune.entries import Iteration, Revocation  # noqa: E402
from swarmtune.jobspec import parse_job_spec  # noqa: E402
from swarmtune.redundancy import verdicts_of  # noqa: E402
from swarmtune.store import connect  # noqa: E402
from swarmtune.wire import service_pb2 as pb  # noqa: E402
from swarmtune.wire.service_pb2_grpc import CoordinatorStub  # noqa: E402
from tests.support.coordinator_harness import SimWorker, channel, default_reward, spec_text, until, write_genesis  # noqa: E402

UNTRUSTED = 20  # worker keys, each its own operator
FRACTIONS = (0.1, 0.2, 0.4)
SPOT_CHECK = 0.05
ITERATIONS = 100
POPULATION = 40
CAPACITY = 4  # 20 x 4 slots = 40 members x 2 replicas
REFEREE_CAPACITY = 16
HONEST_DELAY_S = 0.005  # honest workers evaluate; liars answer at once
FABRICATED = 1.0
TOLERANCE = 1e-6
GOAL = {"fraction": 0.2, "fabricated_share_recorded": 0.01, "honest_revoked": 0}


class Honest(SimWorker):
    """Answers after a short evaluation, so that every liar is faster."""

    async def _answer(self, opened: pb.IterationOpened, members: list[int]) -> None:
        await asyncio.sleep(HONEST_DELAY_S)
        await super()._answer(opened, members)


def spec(job_id: str, spot_check: float) -> bytes:
    schedule = {"redundancy": 2, "revoke_after": 3, "spot_check": spot_check, "redundancy_tolerance": TOLERANCE}
    return spec_text(job_id, population=POPULATION, iterations=ITERATIONS, deadline=30.0, schedule=schedule)


async def run_job(store: Any, job_id: str, liars: int, referee: bool) -> dict[str, Any]:
    """One job to its end; what its ledger records."""
    spec_bytes = spec(job_id, SPOT_CHECK if referee else 0.0)
    job_spec = parse_job_spec(spec_bytes)
    keys = [identity.generate_key() for _ in range(UNTRUSTED + referee)]
    public = [identity.public_key_bytes(k) for k in keys]
    coordinator_key = identity.generate_key()
    write_genesis(store, spec_bytes, job_id, coordinator_key, tuple(public))
    history = open_history(store, job_spec, coordinator_key, tuple(public), make_genesis=lambda: None)  # type: ignore[arg-type,return-value]
    options = ServerOptions(listen="127.0.0.1:0", referees=(public[-1],) if referee else (), min_workers=UNTRUSTED)
    running = await start(job_spec, store, coordinator_key, history, (0.0, 1.0), options)
    job = running.job
    async with channel(f"127.0.0.1:{running.port}") as chan:
        stub = CoordinatorStub(chan)
        workers: list[SimWorker] = []
        for i, key in enumerate(keys):
            lying = i < liars
            common = dict(key=key, operator=f"op{i}", keep_entries=False)
            if lying:
                workers.append(SimWorker(stub, job_id, capacity=CAPACITY, reward=lambda m, s: FABRICATED, **common))  # type: ignore[arg-type]
            else:
                capacity = REFEREE_CAPACITY if referee and i == len(keys) - 1 else CAPACITY
                workers.append(Honest(stub, job_id, capacity=capacity, **common))  # type: ignore[arg-type]
        for worker in workers:
            await worker.join()
            worker.start()
        await until(lambda: len(job.status().workers) >= len(workers), lambda: "workers did not connect")
        started = time.perf_counter()
        await job.start()
        runner = asyncio.create_task(job.run())
        await until(job.finished.is_set, lambda: f"job stuck at iteration {job.history.last_iteration}", timeout_s=600.0)
        wall = time.perf_counter() - started
        runner.cancel()
        for worker in workers:
            await worker.stop()
        job.stop("bench over")
        await running.server.stop(0)
    stored = [entries.parse_entry(s) for s in store.read(job_id)]
    return summarize(stored, set(public[:liars]), wall)


def summarize(stored: list[entries.StoredEntry], liars: set[bytes], wall_s: float) -> dict[str, Any]:
    recorded = fabricated = 0
    revoked_at: dict[bytes, int] = {}
    last_iteration = 0
    for stored_entry in stored:
        body = stored_entry.entry.body
        if isinstance(body, Revocation):
            revoked_at[body.worker_key] = last_iteration + 1  # revoked while closing the next iteration
        if isinstance(body, Iteration):
            last_iteration = body.iteration
            settled = body.counted[0]
            for member, reward in zip(body.members, body.rewards):
                if member.member in settled:
                    recorded += 1
                    fabricated += abs(reward - default_reward(member.member, member.seed)) > TOLERANCE
    caught = [at for key, at in revoked_at.items() if key in liars]
    return {
        "fabricated_share_recorded": round(fabricated / max(1, recorded), 5),
        "honest_revoked": sum(1 for key in revoked_at if key not in liars),
        "liars_revoked": len(caught),
        "liars": len(liars),
        "iterations_to_detect": max(caught) if caught and len(caught) == len(liars) else None,
        "iterations": last_iteration,
        "alerts": sum(len(e.entry.body.alerts) for e in stored if isinstance(e.entry.body, Iteration)),
        "wall_s_per_iteration": round(wall_s / max(1, last_iteration), 4),
    }


def added_ms_per_iteration(referee: bool) -> float:
    """What the Byzantine rules cost the coordinator per iteration at these sizes: the draw, the
    candidate order, the spot checks and every member's verdict (the rest of a close is unchanged)."""
    key = identity.generate_key()
    workers = [identity.generate_key() for _ in range(UNTRUSTED + 1)]
    keys = [identity.public_key_bytes(k) for k in workers]
    referees = frozenset(keys[-1:]) if referee else frozenset()
    results = [MemberResult(keys[(m + r) % UNTRUSTED], m, 0.5) for m in range(POPULATION) for r in range(2)]
    rounds = 200
    started = time.perf_counter()
    for t in range(rounds):
        drawn = draw.make_draw(key, "j", t, bytes(32))
        draw.keyed_order(drawn, keys)
        spot = draw.spot_checks(drawn, range(POPULATION), SPOT_CHECK) if referee else frozenset()
        verdicts_of(results, frozenset(), TOLERANCE, referees, spot)
    return round((time.perf_counter() - started) / rounds * 1000, 3)


async def main() -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp)) as redis:
        store = connect(redis.url)
        for referee in (False, True):
            for fraction in FRACTIONS:
                liars = round(fraction * UNTRUSTED)
                row = await run_job(store, f"byz-{int(fraction * 100)}-{'ref' if referee else 'none'}", liars, referee)
                row.update(fraction=fraction, referee_spot_check=SPOT_CHECK if referee else None, added_ms_per_iteration=added_ms_per_iteration(referee))
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    goal = next(r for r in rows if r["fraction"] == GOAL["fraction"] and r["referee_spot_check"])
    met = goal["honest_revoked"] == 0 and goal["fabricated_share_recorded"] <= GOAL["fabricated_share_recorded"]
    return {
        "bench": "byzantine",
        "untrusted_workers": UNTRUSTED,
        "population": POPULATION,
        "redundancy": 2,
        "revoke_after": 3,
        "iterations": ITERATIONS,
        "results": rows,
        "goal": {**GOAL, "met": met},
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
