"""Population 16,384 (issue 18): batch-signed results from simulated workers, a coordinator killed and
restarted mid-iteration, and a ledger that verifies, audits and replays exactly on the demo model."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc
import pytest
from torch import nn

from swarmtune import batches, entries, identity, ledger
from swarmtune.client.audit import audit
from swarmtune.coordinator.chain import genesis_entry
from swarmtune.coordinator.server import PROTOCOL_VERSION, ServerOptions, open_history, start
from swarmtune.entries import Genesis, Iteration
from swarmtune.jobspec import JobSpec, parse_job_spec
from swarmtune.models import load_model, resolve_model
from swarmtune.noise import NOISE_VERSION
from swarmtune.replay import genesis_plan
from swarmtune.shaping import SHAPING_VERSION
from swarmtune.state import build_plan, master_from_model, state_hash
from swarmtune.store import LedgerStore, connect
from swarmtune.wire import service_pb2 as pb
from swarmtune.wire.service_pb2_grpc import CoordinatorStub
from tests.support.coordinator_harness import SIM_TASK, InProcess, SimWorker, channel, reasons
from tests.support.specs import job_spec

POPULATION = 16_384
WORKERS = 32
CAPACITY = 2 * POPULATION // WORKERS  # redundancy 2: every member evaluated by two workers
TIMEOUT_S = 120


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


def spec_of(job_id: str) -> JobSpec:
    return parse_job_spec(
        job_spec(
            job_id, model="builtin:tiny", seed=7, iterations=2, task={"name": SIM_TASK},
            es={"population": POPULATION, "alpha": 0.01, "sigma": 0.01},
            noise={"family": "lowrank", "rank": 1, "lowrank_others": "frozen"},
            schedule={"deadline_seconds": 120, "attest_every": 0, "redundancy": 2},
        ).encode()
    )  # fmt: skip


def demo_genesis(store: LedgerStore, spec: JobSpec, key: object, admitted: tuple[bytes, ...]) -> nn.Module:
    """The genesis of the demo model (builtin:tiny) for this job, written as a coordinator would; the model."""
    model, _ = load_model(resolve_model(spec.model))
    base = master_from_model(model, build_plan(model, spec.noise_family, spec.lowrank_others))
    genesis = entries.new_genesis(
        spec.spec_bytes, state_hash(base), identity.public_key_bytes(key),  # type: ignore[arg-type]
        protocol_version=PROTOCOL_VERSION, noise_version=NOISE_VERSION, shaping_version=SHAPING_VERSION,
        tensor_plan=genesis_plan(base), admitted_workers=admitted,
    )  # fmt: skip
    assert store.append(genesis_entry(key, spec.job_id, genesis)).ok  # type: ignore[arg-type]
    return model


def _written() -> Genesis:
    raise AssertionError("the test writes genesis itself")


@asynccontextmanager
async def served(store: LedgerStore, spec: JobSpec, key: object, keys: list[object]) -> AsyncIterator[tuple[InProcess, list[SimWorker]]]:
    """One life of the coordinator over the stored ledger, with every worker joined and subscribed; it
    ends without closing anything (as a killed process would)."""
    history = open_history(store, spec, key, (), make_genesis=_written)  # type: ignore[arg-type]
    running = await start(spec, store, key, history, (0.0, 1.0), ServerOptions(listen="127.0.0.1:0"))  # type: ignore[arg-type]
    async with channel(f"127.0.0.1:{running.port}") as chan:
        c = InProcess(running, CoordinatorStub(chan), key)  # type: ignore[arg-type]
        workers = [SimWorker(c.stub, spec.job_id, key=k, capacity=CAPACITY, auto=False, keep_entries=False) for k in keys]  # type: ignore[arg-type]
        await c.begin(*workers)
        try:
            yield c, workers
        finally:
            assert c.runner is not None
            c.runner.cancel()
            await running.server.stop(0)


async def answer(workers: list[SimWorker], iteration: int) -> list[tuple[bytes, pb.SubmitReply]]:
    """Each worker sends its assignment of `iteration` as one batch: the batches and the replies."""

    async def one(worker: SimWorker) -> tuple[bytes, pb.SubmitReply]:
        opened = await worker.until_opened(iteration)
        data = worker.batch(opened, sorted(opened.assigned))
        return data, await worker.submit([data])

    return await asyncio.gather(*(one(w) for w in workers))


def test_population_16384_holds_chain_signatures_admission_redundancy_resume_and_replay(store: LedgerStore, job_id: str) -> None:
    spec = spec_of(job_id)
    key = identity.generate_key()
    keys = [identity.generate_key() for _ in range(WORKERS)]
    model = demo_genesis(store, spec, key, tuple(identity.public_key_bytes(k) for k in keys))
    sent_before_kill: list[bytes] = []

    async def first_life() -> None:
        async with served(store, spec, key, keys) as (c, workers):
            assert all(set(reasons(r)) == {pb.ACCEPTED} for _, r in await answer(workers, 1))
            await c.until_closed(1)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # admission: a key the ledger never admitted
                await SimWorker(c.stub, job_id).join()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            for data, reply in await answer(workers[: WORKERS // 2], 2):
                assert set(reasons(reply)) == {pb.ACCEPTED}  # stored in Redis before the reply
                sent_before_kill.append(data)
        # the coordinator dies here with iteration 2 open

    async def second_life() -> None:
        async with served(store, spec, key, keys) as (c, workers):
            resent = await asyncio.gather(*(w.submit([data]) for w, data in zip(workers, sent_before_kill)))
            assert all(set(reasons(r)) == {pb.DUPLICATE} for r in resent)  # idempotent across the restart
            await answer(workers, 2)
            await asyncio.wait_for(c.job.finished.wait(), TIMEOUT_S)

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(first_life(), TIMEOUT_S))
    asyncio.run(asyncio.wait_for(second_life(), TIMEOUT_S))
    stored = list(store.read(job_id))
    bodies = [b for b in (entry.entry.body for _, entry in ledger.walk(stored)) if isinstance(b, Iteration)]
    assert [b.iteration for b in bodies] == [1, 2]
    for body in bodies:  # redundancy: every member twice, by two workers, agreeing
        first, several = body.counted
        assert len(body.results) == 2 * POPULATION and len(first) == len(several) == POPULATION
        assert all(len(set(rewards)) == 1 for rewards in several.values()) and not body.disputed and all(body.coefficients)
    recorded = {r.batch.signature for r in bodies[1].batches}
    assert {batches.decode_batch(data).signature for data in sent_before_kill} <= recorded  # resumed, not redone
    report = ledger.verify_chain(stored, identity.public_key_bytes(key))
    assert report.ok and report.worker_signatures == sum(len(b.batches) for b in bodies)  # one signature per batch
    audited = audit(stored, model)  # chain, seeds, coefficients, verdicts, then an exact replay
    assert audited.ok and audited.replayed, audited.problem
    assert time.monotonic() - started < 60  # the acceptance bound (issue 18)
