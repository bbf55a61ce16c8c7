"""The coordinator over real gRPC and Redis: bad input is rejected with a clear reason, nothing is lost."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable

import grpc
import pytest

from swarmtune import entries, identity, ledger
from swarmtune.coordinator.limits import Limits
from swarmtune.coordinator.server import ServerError
from swarmtune.coordinator.validation import MAX_BATCH_BYTES
from swarmtune.entries import Iteration, RetentionReport
from swarmtune.join import join_request
from swarmtune.store import LedgerStore, connect
from swarmtune.wire import service_pb2 as pb
from tests.support.coordinator_harness import InProcess, SimWorker, in_process, spec_text, with_workers
from tests.support.coordinator_harness import reasons as member_reasons  # the names `reasons` below

TIMEOUT_S = 30


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))


def iteration_entries(store: LedgerStore, job_id: str) -> list[Iteration]:
    bodies = [entry.entry.body for _, entry in ledger.walk(store.read(job_id))]  # verified, coefficients derived
    return [body for body in bodies if isinstance(body, Iteration)]


def reasons(reply: pb.SubmitReply) -> list[str]:
    return [pb.Reason.Name(reason) for reason in member_reasons(reply)]


async def joined(store: LedgerStore, job_id: str, count: int, body: Callable[[InProcess, list[SimWorker]], Awaitable[None]], **spec: Any) -> None:
    """`body` with `count` manual workers that share a 6-member population and are subscribed."""
    async with with_workers(store, spec_text(job_id, **spec), count, auto=False, capacity=6 // count) as (c, workers):
        await c.begin(*workers)
        await body(c, workers)


def test_job_runs_to_the_end_and_the_ledger_verifies(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=3), 3) as (c, workers):
            await c.begin(*workers)
            await c.job.finished.wait()
            await asyncio.gather(*(w.closed.wait() for w in workers))
            status = await c.stub.Status(pb.StatusRequest())
        assert status.state == pb.JobStatus.FINISHED and status.closed == 3 and len(status.recent) == 3
        assert sum(w.accepted for w in status.workers) == 18 and not status.rejects
        for worker in workers:  # every worker saw every entry, in order, then the end
            assert worker.indices() == list(range(4)) and worker.finished()
            assert [d.index for d in worker.digests()] == [1, 2, 3]  # iteration entries by their digests
        bodies = iteration_entries(store, job_id)
        assert [b.iteration for b in bodies] == [1, 2, 3]
        assert all(len(b.results) == 6 and all(b.coefficients) for b in bodies)

    run(scenario)


def test_the_first_iteration_waits_for_min_workers(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=2), 2, min_workers=2) as (c, (first, second)):
            await c.job.start()
            await first.join()
            first.start()
            await c.until_connected(1)
            await c.job._tick()  # the runner's step, with one of the two workers connected: it must not open
            status = await c.stub.Status(pb.StatusRequest())
            assert status.iteration == 0 and status.closed == 0 and sum(w.connected for w in status.workers) == 1
            assert not first.opened
            c.runner = asyncio.create_task(c.job.run())
            await second.join()
            second.start()
            await c.job.finished.wait()
        assert set(first.opened) == set(second.opened) == {1, 2}
        assert all(len(opened.assigned) == 3 for w in (first, second) for opened in w.opened.values())

    run(scenario)


def test_min_workers_beyond_the_admitted_is_refused_at_start(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        with pytest.raises(ServerError, match="--min-workers 3 can never be met: only 2 workers are admitted"):
            async with with_workers(store, spec_text(job_id), 2, min_workers=3):
                pass

    run(scenario)


def test_each_bad_result_gets_its_reason_and_good_ones_still_count(store: LedgerStore, job_id: str) -> None:
    async def body(c: InProcess, workers: list[SimWorker]) -> None:
        a, b = workers
        opened = await a.until_opened(1)
        mine, theirs = list(opened.assigned), [m for m in range(6) if m not in opened.assigned]
        assert mine and theirs
        m = mine[0]
        good = a.result(opened, m, 0.25)
        forged = bytearray(a.result(opened, m, 0.3))
        forged[-1] ^= 1  # flip a signature bit
        other_key = identity.generate_key()
        cases = {
            "BAD_SIGNATURE": bytes(forged),
            "KEY_MISMATCH": SimWorker(c.stub, job_id, key=other_key).result(opened, m, 0.5),
            "NOT_ASSIGNED": a.result(opened, theirs[0], 0.5),
            "NON_FINITE_REWARD": a.result(opened, m, math.nan),
            "REWARD_OUT_OF_RANGE": a.result(opened, m, 1.5),
            "WRONG_HEAD": a.result(opened, m, 0.5, head_hash=bytes(32)),
            "WRONG_JOB": a.result(opened, m, 0.5, job_id="another-job"),
            "ITERATION_NOT_OPEN": a.result(opened, m, 0.5, iteration=2),
            "MALFORMED": b"\x08\x96\x01 not a ResultBatch",
        }
        infinite = a.result(opened, m, math.inf)
        reply = await a.submit([*cases.values(), infinite])
        assert reasons(reply) == [*cases, "NON_FINITE_REWARD"]
        assert all(status.detail for b in reply.batches for status in (b.members or [b.status]))
        reply = await a.submit([good, good])
        assert reasons(reply) == ["ACCEPTED", "DUPLICATE"]
        assert reasons(await a.submit([good, a.result(opened, m, 0.75)])) == ["DUPLICATE", "CONFLICTING_RESULT"]
        # the rest of the population, then the iteration closes with exactly the good results
        await a.submit([a.result(opened, x) for x in mine[1:]])
        opened_b = await b.until_opened(1)
        await b.submit([b.result(opened_b, x) for x in opened_b.assigned])
        await c.until_closed(1)
        late = await a.submit([good, a.result(opened, m, 0.5)])
        assert reasons(late) == ["DUPLICATE", "ITERATION_CLOSED"]  # a resend of what was recorded is no error
        status = await c.stub.Status(pb.StatusRequest())
        assert status.rejects["BAD_SIGNATURE"] == 1 and status.rejects["NON_FINITE_REWARD"] == 2
        assert status.rejects["ITERATION_CLOSED"] == 1

    run(lambda: joined(store, job_id, 2, body, iterations=2))
    first = iteration_entries(store, job_id)[0]
    assert len(first.results) == 6 and len({r.member for r in first.results}) == 6
    assert 0.25 in first.rewards


def test_each_member_of_a_batch_gets_its_reason_and_the_entry_records_the_batch_with_what_it_left_out(store: LedgerStore, job_id: str) -> None:
    async def body(c: InProcess, workers: list[SimWorker]) -> None:
        a, b = workers
        opened = await a.until_opened(1)
        mine, theirs = sorted(opened.assigned), [m for m in range(6) if m not in opened.assigned]
        mixed = a.batch(opened, [mine[0], mine[1], theirs[0]], [0.25, 1.5, 0.5])
        by_member = lambda reply: dict(zip(sorted([mine[0], mine[1], theirs[0]]), reasons(reply)))  # noqa: E731  (statuses follow the batch's member order)
        expected = {mine[0]: "ACCEPTED", mine[1]: "REWARD_OUT_OF_RANGE", theirs[0]: "NOT_ASSIGNED"}
        assert by_member(await a.submit([mixed])) == expected
        assert by_member(await a.submit([mixed])) == {**expected, mine[0]: "DUPLICATE"}  # idempotent
        assert reasons(await a.submit([a.batch(opened, mine[1:])])) == ["ACCEPTED"] * len(mine[1:])
        opened_b = await b.until_opened(1)
        await b.submit([b.batch(opened_b, sorted(opened_b.assigned))])
        await c.until_closed(1)

    run(lambda: joined(store, job_id, 2, body, iterations=1))
    (first,) = iteration_entries(store, job_id)
    (mixed,) = [r for r in first.batches if 1.5 in r.batch.rewards]  # recorded whole, under its signature
    assert len(mixed.excluded) == 2 and len(mixed.counted()[0]) == 1 and len(first.results) == 6


def test_the_submission_that_completes_an_iteration_is_acknowledged_once_its_entry_is_stored(store: LedgerStore, job_id: str) -> None:
    async def body(c: InProcess, workers: list[SimWorker]) -> None:
        (a,) = workers
        opened = await a.until_opened(1)
        *first, last = opened.assigned
        assert set(reasons(await a.submit([a.result(opened, m) for m in first]))) == {"ACCEPTED"}
        assert iteration_entries(store, job_id) == []
        assert reasons(await a.submit([a.result(opened, last)])) == ["ACCEPTED"]
        (entry,) = iteration_entries(store, job_id)  # in Redis before the reply: nothing acknowledged is lost
        assert sorted(r.member for r in entry.results) == sorted(opened.assigned)

    run(lambda: joined(store, job_id, 1, body, iterations=2))


def test_a_close_that_cannot_be_stored_acknowledges_nothing(store: LedgerStore, job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from swarmtune.store import StoreError

    async def body(c: InProcess, workers: list[SimWorker]) -> None:
        (a,) = workers
        opened = await a.until_opened(1)

        def redis_gone(*args: object, **kwargs: object) -> None:
            raise StoreError("Redis at the test's URL is unreachable")

        monkeypatch.setattr(c.job._chain, "append", redis_gone)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.submit([a.result(opened, m) for m in opened.assigned])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "nothing was acknowledged" in (info.value.details() or "")
        assert c.runner is not None
        with pytest.raises(StoreError):  # the coordinator stops; a restart resumes from Redis
            await c.runner

    run(lambda: joined(store, job_id, 1, body, iterations=2))
    assert iteration_entries(store, job_id) == []


def test_whole_call_refusals(store: LedgerStore, job_id: str) -> None:
    async def body(c: InProcess, workers: list[SimWorker]) -> None:
        (a,) = workers
        opened = await a.until_opened(1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.stub.SubmitResults(pb.SubmitRequest(session=b"forged", batches=[]))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "join again" in (info.value.details() or "")
        too_many = [a.result(opened, opened.assigned[0])] * (Limits().max_batches_per_call + 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.submit(too_many)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "split the submission" in (info.value.details() or "")
        oversized = [b"x" * 1024 * 1024] * 3  # 3 MiB: over the 2 MiB receive limit
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.submit(oversized)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        big_item = await a.submit([b"x" * (MAX_BATCH_BYTES + 1)])
        assert reasons(big_item) == ["MALFORMED"] and f"more than {MAX_BATCH_BYTES}" in big_item.batches[0].status.detail
        # nothing was lost: the worker's results still go through
        reply = await a.submit([a.result(opened, m) for m in opened.assigned])
        assert set(reasons(reply)) == {"ACCEPTED"}
        await c.job.finished.wait()

    run(lambda: joined(store, job_id, 1, body, iterations=1))
    assert len(iteration_entries(store, job_id)[0].results) == 6


def test_join_refusals(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        admitted_key = identity.generate_key()
        async with in_process(store, spec_text(job_id), (identity.public_key_bytes(admitted_key),)) as c:
            stranger = SimWorker(c.stub, job_id)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stranger.join()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--admit" in (info.value.details() or "")
            challenge = await c.stub.GetChallenge(pb.ChallengeRequest())
            assert challenge.job_id == job_id and len(challenge.nonce) == 32
            request = join_request(admitted_key, job_id, challenge.nonce, 2, "op")
            await c.stub.Join(request)
            with pytest.raises(grpc.aio.AioRpcError) as info:  # a nonce is single-use
                await c.stub.Join(request)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "GetChallenge" in (info.value.details() or "")
            challenge = await c.stub.GetChallenge(pb.ChallengeRequest())
            tampered = join_request(admitted_key, job_id, challenge.nonce, 2, "op")
            tampered.signature = bytes(64)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.Join(tampered)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "signature" in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.Join(pb.JoinRequest(proof=b"\xff\xff", signature=b""))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            wrong_job = join_request(admitted_key, "other-job", (await c.stub.GetChallenge(pb.ChallengeRequest())).nonce, 2, "op")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.Join(wrong_job)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    run(scenario)


def test_open_enrollment_admits_in_the_ledger(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with in_process(store, spec_text(job_id, iterations=1), open_enrollment=True) as c:
            await c.begin(SimWorker(c.stub, job_id))
            await c.job.finished.wait()
        kinds = [entries.parse_entry(s).kind for s in store.read(job_id)]
        assert kinds == ["genesis", "admission", "iteration"]

    run(scenario)


def test_rate_limit_per_worker(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        key = identity.generate_key()
        limits = Limits(calls_per_s=1.0, call_burst=3.0)
        async with in_process(store, spec_text(job_id), (identity.public_key_bytes(key),), limits=limits) as c:
            worker = SimWorker(c.stub, job_id, key=key, auto=False)
            await worker.join()
            for _ in range(3):
                await worker.submit([])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await worker.submit([])
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in (info.value.details() or "")

    run(scenario)


def test_retention_and_attestation(store: LedgerStore, job_id: str) -> None:
    retention = {"task": "countdown", "every": 1, "alert_threshold": 0.2}

    async def body(c: InProcess, workers: list[SimWorker]) -> None:
        (a,) = workers
        opened = await a.until_opened(1)
        assert opened.measure_retention
        record = RetentionReport(job_id, 1, opened.head_hash, a.public, (("probe", 0.9),))
        report = entries.encode_signed(entries.sign_record(a.key, record))
        reply = await a.submit([a.result(opened, m) for m in opened.assigned], [report])
        assert [pb.Reason.Name(s.reason) for s in reply.retention] == ["ACCEPTED"]
        opened2 = await a.until_opened(2)
        attestation = entries.Attestation(job_id, 1, bytes(range(32)), a.public)
        signed = entries.encode_signed(entries.sign_record(a.key, attestation))
        reply_a = await a.stub.Attest(pb.AttestRequest(session=a.session, attestation=signed))
        assert pb.Reason.Name(reply_a.status.reason) == "ACCEPTED"
        again = await a.stub.Attest(pb.AttestRequest(session=a.session, attestation=signed))
        assert pb.Reason.Name(again.status.reason) == "DUPLICATE"
        future = entries.encode_signed(entries.sign_record(a.key, entries.Attestation(job_id, 5, bytes(32), a.public)))
        early = await a.stub.Attest(pb.AttestRequest(session=a.session, attestation=future))
        assert pb.Reason.Name(early.status.reason) == "ITERATION_NOT_OPEN"
        low = RetentionReport(job_id, 2, opened2.head_hash, a.public, (("probe", 0.5),))
        await a.submit([a.result(opened2, m) for m in opened2.assigned], [entries.encode_signed(entries.sign_record(a.key, low))])
        await c.job.finished.wait()
        status = await c.stub.Status(pb.StatusRequest())
        assert status.alerts and "probe fell from 0.9000 to 0.5000" in status.alerts[0]

    run(lambda: joined(store, job_id, 1, body, iterations=2, retention=retention))
    kinds = [entries.parse_entry(s).kind for s in store.read(job_id)]
    assert kinds == ["genesis", "iteration", "attestation", "iteration"]
    first, second = iteration_entries(store, job_id)
    assert len(first.retention) == 1 and second.alerts


def test_fetch_ledger_ranges(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        key = identity.generate_key()
        async with in_process(store, spec_text(job_id, iterations=2), (identity.public_key_bytes(key),)) as c:
            worker = SimWorker(c.stub, job_id, key=key)
            await c.begin(worker)
            await c.job.finished.wait()
            every = [e async for e in c.stub.FetchLedger(pb.FetchLedgerRequest(from_index=0))]
            tail = [e async for e in c.stub.FetchLedger(pb.FetchLedgerRequest(from_index=1, to_index=2))]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [e async for e in c.stub.FetchLedger(pb.FetchLedgerRequest(from_index=9))]
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
            ahead = c.stub.Subscribe(pb.SubscribeRequest(session=worker.session, from_index=9))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [m async for m in ahead]
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and "beyond" in (info.value.details() or "")
        assert [e.stored for e in every] == list(store.read(job_id))
        assert [e.index for e in tail] == [1]

    run(scenario)
