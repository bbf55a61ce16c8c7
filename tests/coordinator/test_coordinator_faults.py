"""Coordinator under faults, with simulated workers: liars, lost workers, stragglers, late joiners, SIGKILL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import grpc
import pytest

from swarmtune import batches, entries, identity, ledger
from swarmtune.coordinator.chain import History, recover
from swarmtune.digest import open_digest
from swarmtune.entries import Iteration, Revocation
from swarmtune.store import LedgerStore, connect
from swarmtune.wire import service_pb2 as pb
from swarmtune.wire.service_pb2_grpc import CoordinatorStub
from tests.support.coordinator_harness import CoordinatorProcess, SimWorker, channel, default_reward, reasons, spec_text, with_workers, write_genesis

TIMEOUT_S = 60
T = TypeVar("T")


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


def bodies(store: LedgerStore, job_id: str) -> list[entries.Body]:
    return [entry.entry.body for _, entry in ledger.walk(store.read(job_id))]  # verified, coefficients derived


def iterations(store: LedgerStore, job_id: str) -> list[Iteration]:
    return [b for b in bodies(store, job_id) if isinstance(b, Iteration)]


def test_fabricated_rewards_are_outvoted_and_the_liar_revoked(store: LedgerStore, job_id: str) -> None:
    live: list[History] = []

    async def scenario() -> None:
        schedule = {"redundancy": 2, "revoke_after": 2, "redundancy_tolerance": 0.0}
        async with with_workers(store, spec_text(job_id, iterations=4, schedule=schedule), 4, capacity=3) as (c, workers):
            liar = workers[3]
            liar.reward = lambda m, s: 1.0 - default_reward(m, s)
            await c.begin(*workers)
            await asyncio.wait_for(c.job.finished.wait(), TIMEOUT_S)
            live.append(c.job.history)
            status = await c.stub.Status(pb.StatusRequest())
            with pytest.raises(grpc.aio.AioRpcError) as info:  # its session ended with the revocation
                await liar.submit([])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:  # and it cannot come back
                await liar.join()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (info.value.details() or "")
        liar_status = next(w for w in status.workers if w.worker_id == identity.fingerprint(liar.public))
        assert liar_status.revoked and liar_status.strikes >= 2

    asyncio.run(scenario())
    all_bodies = bodies(store, job_id)
    revocations = [i for i, b in enumerate(all_bodies) if isinstance(b, Revocation)]
    assert len(revocations) == 1
    liar_key = all_bodies[revocations[0]].worker_key  # type: ignore[union-attr]
    for body in iterations(store, job_id):
        # every recorded reward is the honest one; the liar never decides a member
        for member, reward, coefficient in zip(body.members, body.rewards, body.coefficients):
            if coefficient:
                assert reward == default_reward(member.member, member.seed)
        if all_bodies.index(body) > revocations[0]:
            assert all(r.worker_key != liar_key for r in body.results)
    # A restart recounts from the ledger what the live run counted (the liar's last strikes, never
    # recorded, are named by its revocation).
    (history,) = live
    recovered = recover(store.read(job_id), history.genesis.coordinator_key, 0.0)
    assert recovered.strikes == history.strikes and recovered.strikes[liar_key] >= 2
    assert list(recovered.figures) == list(history.figures) and recovered.revoked == history.revoked


def test_lost_worker_members_are_reassigned_at_once(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=1, deadline=60), 3, capacity=2) as (c, workers):
            workers[2].auto = False
            await c.begin(*workers)
            assert (await workers[2].until_opened(1)).assigned
            started = time.monotonic()
            await workers[2].stop()  # the worker dies holding members
            await asyncio.wait_for(c.job.finished.wait(), TIMEOUT_S)
            assert time.monotonic() - started < 10  # long before the 60 s deadline

    asyncio.run(scenario())
    (body,) = iterations(store, job_id)
    assert len({r.member for r in body.results}) == 6


def test_straggler_members_go_to_idle_workers_before_the_deadline(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=1, deadline=4), 3, capacity=2) as (c, workers):
            workers[2].auto = False  # connected, silent
            await c.begin(*workers)
            await asyncio.wait_for(c.job.finished.wait(), TIMEOUT_S)
            status = await c.stub.Status(pb.StatusRequest())
        assert 1.5 < status.recent[0].wall_s < 4.0  # after the straggle point (2 s), before the deadline

    asyncio.run(scenario())
    (body,) = iterations(store, job_id)
    assert len(body.results) == 6


def test_deadline_closes_with_quorum(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        spec = spec_text(job_id, iterations=1, deadline=1.5, schedule={"quorum": 0.5})
        async with with_workers(store, spec, 2, capacity=3, take_reassignments=False) as (c, workers):
            workers[1].auto = False
            await c.begin(*workers)
            await asyncio.wait_for(c.job.finished.wait(), TIMEOUT_S)

    asyncio.run(scenario())
    (body,) = iterations(store, job_id)
    assert len(body.results) == 3 and sum(1 for c in body.coefficients if c) == 3


def test_late_joiner_catches_up_with_every_entry(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=4), 2, capacity=6) as (c, (first, late)):
            first.auto = False
            await c.begin(first)
            for t in (1, 2):
                opened = await first.until_opened(t)
                await first.submit([first.result(opened, m) for m in range(6)])
            await c.until_closed(2)
            await late.join()
            late.start(from_index=0)
            await asyncio.wait_for(c.job.finished.wait(), TIMEOUT_S)
            await asyncio.wait_for(late.closed.wait(), TIMEOUT_S)
        assert late.indices() == list(range(5)) and late.finished()
        stored = list(store.read(job_id))
        assert all(e.stored == stored[e.index] for e in late.entries())
        # what went out live by digest commits to the stored entry
        assert late.digests() and all(open_digest(d.digest, identity.public_key_bytes(c.key)).entry_hash == entries.entry_hash(stored[d.index]) for d in late.digests())

    asyncio.run(scenario())


def test_sigkill_and_restart_resume_the_open_iteration(store: LedgerStore, redis_url: str, job_id: str, tmp_path: Path) -> None:
    key = identity.generate_key()
    key_file = tmp_path / "coordinator.key"
    identity.save_private_key(key, key_file)
    job_file = tmp_path / "job.toml"
    job_file.write_bytes(spec_text(job_id, iterations=2, deadline=60))
    workers_keys = [identity.generate_key() for _ in range(2)]
    public = tuple(identity.public_key_bytes(k) for k in workers_keys)
    write_genesis(store, job_file.read_bytes(), job_id, key, public)
    # Both workers subscribed before the iteration opens, so each holds its 3 members from the opening:
    # with one worker at the opening, the other's share depends on when its subscription lands (the
    # first worker's submission frees capacity that takes unheld members), and it may get one member.
    coordinator = CoordinatorProcess(job_file, redis_url, key_file, public, "--min-workers", "2")

    async def first_life(stub: CoordinatorStub) -> list[bytes]:
        workers = [SimWorker(stub, job_id, key=k, capacity=3, auto=False) for k in workers_keys]
        for w in workers:
            await w.join()
            w.start()
        acknowledged = []
        for w in workers:
            opened = await w.until_opened(1)
            partial = [w.result(opened, m) for m in opened.assigned[:-1]]  # leave the iteration open
            reply = await w.submit(partial)
            assert set(reasons(reply)) == {pb.ACCEPTED}
            acknowledged += partial
        assert acknowledged
        return acknowledged

    async def second_life(stub: CoordinatorStub, acknowledged: list[bytes]) -> None:
        workers = [SimWorker(stub, job_id, key=k, capacity=3, auto=False) for k in workers_keys]
        for w in workers:
            await w.join()
            w.start(from_index=1)
        # Both hear of the resumed iteration before either answers: the first answer may close it.
        resumed = [await w.until_opened(1) for w in workers]
        replies = []
        for w, opened in zip(workers, resumed):
            w.auto = True  # from iteration 2 on
            assert opened.head_hash == entries.entry_hash(next(iter(store.read(job_id, 0, 0))))
            # resend everything held before the kill, plus what is still owed
            mine = [a for a in acknowledged if batches.decode_batch(a).worker_key == w.public]
            replies.append(await w.submit(mine + [w.result(opened, m) for m in opened.assigned]))
        # A member the first worker left unanswered when its stream ended was handed to the other (a LOST
        # assignment and the departure, journaled together); when the kill came before that journal write
        # landed, the restart restores the opening's holder as well, so both may answer it: the later
        # answer is SETTLED, or ITERATION_CLOSED if the earlier one closed it.
        unneeded = (pb.SETTLED, pb.ITERATION_CLOSED)
        assert all(reason in (pb.ACCEPTED, pb.DUPLICATE, *unneeded) for r in replies for reason in reasons(r))
        assert sum(reason in unneeded for r in replies for reason in reasons(r)) <= 1
        assert sum(reason == pb.DUPLICATE for r in replies for reason in reasons(r)) == len(acknowledged)
        await asyncio.gather(*(w.closed.wait() for w in workers))

    try:
        port = coordinator.start()
        acknowledged = asyncio.run(_with_stub(port, first_life))
        coordinator.kill()
        assert not iterations(store, job_id)  # iteration 1 was open, not closed
        port = coordinator.start()
        asyncio.run(_with_stub(port, lambda stub: second_life(stub, acknowledged)))
        assert coordinator.wait(TIMEOUT_S) == 0
    except BaseException:
        print("coordinator events:", *coordinator.events[-30:], sep="\n")
        raise
    finally:
        coordinator.kill()
    assert any(e.get("event") == "resumed iteration" and e.get("results") == len(acknowledged) for e in coordinator.events)
    first, second = iterations(store, job_id)
    assert (first.iteration, second.iteration) == (1, 2)
    recorded = {(r.worker_key, r.member, r.reward) for r in first.results}
    held = {(b.worker_key, b.members[0], b.rewards[0]) for b in map(batches.decode_batch, acknowledged)}
    assert held <= recorded and len(first.results) == 6


async def _with_stub(port: int, body: Callable[[CoordinatorStub], Awaitable[T]]) -> T:
    async with channel(f"127.0.0.1:{port}") as chan:
        return await asyncio.wait_for(body(CoordinatorStub(chan)), TIMEOUT_S)
