"""The close builds its entry while the last journal writes land: a batch whose write then fails is
withdrawn and left out of the entry, its submitter told nothing was accepted."""

from __future__ import annotations

import asyncio
import threading
from typing import Mapping

import grpc
import pytest

from swarmtune import ledger
from swarmtune.coordinator.round import BATCH_PREFIX
from swarmtune.entries import Iteration
from swarmtune.store import LedgerStore, StoreError, connect
from swarmtune.wire import service_pb2 as pb
from tests.support.coordinator_harness import reasons, spec_text, until, with_workers

TIMEOUT_S = 30


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


class HeldBatches:
    """The journal's store, but a write of batch fields waits for `release`, then fails."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.release = threading.Event()

    def put_open(self, job_id: str, fields: Mapping[bytes, bytes]) -> None:
        if any(name.startswith(BATCH_PREFIX) for name in fields):
            self.release.wait(TIMEOUT_S)
            raise StoreError("Redis went away")
        self.store.put_open(job_id, fields)


def test_a_batch_whose_journal_write_fails_while_the_close_builds_is_left_out(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=2), 2, auto=False, capacity=3) as (c, (a, b)):
            await c.begin(a, b)
            opened_a, opened_b = await a.until_opened(1), await b.until_opened(1)
            journal = HeldBatches(store)
            c.job._journal._store = journal  # type: ignore[assignment]
            first = asyncio.create_task(a.submit([a.batch(opened_a, list(opened_a.assigned))]))
            current = c.job._round
            assert current is not None
            await until(lambda: current.result_count() == 3, lambda: f"{current.result_count()} results taken")
            last = asyncio.create_task(b.submit([b.batch(opened_b, list(opened_b.assigned))]))
            await until(lambda: current.closing, lambda: "the close did not start")  # built, now draining
            journal.release.set()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await first
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "nothing was accepted" in (refused.value.details() or "")
            assert set(reasons(await last)) == {pb.ACCEPTED}
            bodies = [e.entry.body for _, e in ledger.walk(store.read(job_id))]
            (entry,) = [body for body in bodies if isinstance(body, Iteration)]
            assert sorted(r.member for r in entry.results) == sorted(opened_b.assigned)

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
