"""The end of a job: the coordinator waits for the final attestations while the owing workers are subscribed (bounded)."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarmtune import entries
from swarmtune.entries import Attestation
from swarmtune.store import LedgerStore, connect
from swarmtune.wire import service_pb2 as pb
from tests.support.coordinator_harness import SimWorker, spec_text, with_workers

TIMEOUT_S = 30
STATE = b"s" * 32


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


async def attest(worker: SimWorker, iteration: int) -> str:
    signed = entries.sign_record(worker.key, Attestation(worker.job_id, iteration, STATE, worker.public))
    reply = await worker.stub.Attest(pb.AttestRequest(session=worker.session, attestation=entries.encode_signed(signed)))
    return pb.Reason.Name(reply.status.reason)


def test_owing_workers_keep_their_stream_and_the_wait_ends_once_they_attested_or_left(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=1, schedule={"attest_every": 1}), 3, capacity=2) as (c, workers):
            await c.begin(*workers)
            await c.job.finished.wait()
            await asyncio.sleep(0.2)
            assert not any(w.closed.is_set() for w in workers), "an owing worker's stream ended before it attested"
            assert await attest(workers[0], 1) == "ACCEPTED"
            await workers[1].stop()  # left without attesting (a crash, say)
            waiting = asyncio.create_task(c.job.await_final_attestations(grace_s=0.5, max_s=20))
            await asyncio.sleep(1.0)
            assert not waiting.done(), "stopped waiting while a worker was still subscribed"
            assert await attest(workers[2], 1) == "ACCEPTED"  # the slow hasher, at last
            started = time.monotonic()
            await asyncio.wait_for(waiting, 5)  # worker 1 left: not waited for beyond the grace
            assert time.monotonic() - started < 1.0
            await asyncio.wait_for(asyncio.gather(workers[0].closed.wait(), workers[2].closed.wait()), 5)

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))


def test_a_subscribed_worker_that_never_attests_is_waited_for_at_most_max_s(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=1, schedule={"attest_every": 1}), 1) as (c, workers):
            await c.begin(*workers)
            await c.job.finished.wait()
            started = time.monotonic()
            await c.job.await_final_attestations(grace_s=0.2, max_s=1.5)
            assert 1.5 <= time.monotonic() - started < 3.0
            await asyncio.wait_for(workers[0].closed.wait(), 5)  # its stream ends with the wait

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
