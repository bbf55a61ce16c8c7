"""Announcements that queue up for a stream travel as one message, each in the `then` of the one before."""

from __future__ import annotations

import asyncio

import pytest

from swarmtune.coordinator.broadcast import CARRY_BYTES, CARRY_LIMIT, Broadcaster, End, announce, carried, compact_outgoing, entry_outgoing
from swarmtune.coordinator.limits import Refused
from swarmtune.store import LedgerStore, connect
from swarmtune.wire import service_pb2 as pb
from swarmtune.worker.session import unfold
from tests.support.coordinator_harness import spec_text, with_workers

KEY = bytes(32)
TIMEOUT_S = 30


def opened(iteration: int) -> pb.Announcement:
    return pb.Announcement(opened=pb.IterationOpened(iteration=iteration, assigned=[iteration, iteration + 1]))


def kinds(data: bytes) -> list[str | None]:
    return [a.WhichOneof("kind") for a in unfold(pb.Announcement.FromString(data))]


def test_carried_announcements_unfold_in_order_and_unchanged() -> None:
    parts = [
        pb.Announcement(compact=pb.Compact(index=7, digest=b"d" * 300)),  # a length that needs a 2-byte varint
        opened(8),
        pb.Announcement(finished=pb.JobFinished(last_iteration=8, head_index=9, reason="completed")),
    ]
    unfolded = list(unfold(pb.Announcement.FromString(carried([p.SerializeToString() for p in parts]))))
    assert len(unfolded) == 3
    for got, want in zip(unfolded, parts):
        got.ClearField("then")
        assert got == want
    alone = opened(3).SerializeToString()
    assert carried([alone]) == alone and list(unfold(pb.Announcement.FromString(alone))) == [opened(3)]


def test_what_queued_goes_as_one_message_without_entries_already_sent() -> None:
    async def scenario() -> list[bytes]:
        broadcast = Broadcaster(100)
        subscriber = broadcast.add(KEY)
        broadcast.publish(entry_outgoing(4, b"already sent while catching up"))
        broadcast.publish(compact_outgoing(5, b"digest"))
        broadcast.send(KEY, announce(opened(3), opened=3))
        stream = subscriber.messages(after=4)
        first = await anext(stream)
        broadcast.send(KEY, announce(opened(4), opened=4))
        broadcast.send(KEY, End("test over"))
        return [first, *[data async for data in stream]]

    first, second = asyncio.run(scenario())
    assert kinds(first) == ["compact", "opened"] and pb.Announcement.FromString(first).compact.index == 5
    assert kinds(second) == ["opened"]


def test_a_long_queue_is_cut_into_messages_of_at_most_the_carry_limit() -> None:
    async def scenario() -> list[bytes]:
        broadcast = Broadcaster(100)
        subscriber = broadcast.add(KEY)
        for iteration in range(CARRY_LIMIT + 1):
            broadcast.send(KEY, announce(opened(iteration)))
        broadcast.send(KEY, End("test over"))
        return [data async for data in subscriber.messages(after=0)]

    sent = asyncio.run(scenario())
    assert [len(kinds(data)) for data in sent] == [CARRY_LIMIT, 1]
    assert [a.opened.iteration for data in sent for a in unfold(pb.Announcement.FromString(data))] == list(range(CARRY_LIMIT + 1))


def test_large_announcements_are_carried_only_up_to_the_byte_bound() -> None:
    big = CARRY_BYTES // 2 + 1  # two fit in no message together

    async def scenario() -> list[bytes]:
        broadcast = Broadcaster(100)
        subscriber = broadcast.add(KEY)
        for index in range(1, 4):
            broadcast.publish(compact_outgoing(index, bytes([index]) * big))
        broadcast.send(KEY, announce(opened(3)))
        broadcast.send(KEY, End("test over"))
        return [data async for data in subscriber.messages(after=0)]

    sent = asyncio.run(scenario())
    assert [kinds(data) for data in sent] == [["compact"], ["compact"], ["compact", "opened"]]
    assert [a.compact.index for data in sent for a in unfold(pb.Announcement.FromString(data)) if a.compact.index] == [1, 2, 3]


def test_an_overflowing_stream_sends_what_it_holds_then_is_refused() -> None:
    async def scenario() -> list[bytes]:
        broadcast = Broadcaster(2)
        subscriber = broadcast.add(KEY)
        for iteration in range(3):
            broadcast.send(KEY, announce(opened(iteration)))
        sent = []
        with pytest.raises(Refused) as info:
            async for data in subscriber.messages(after=0):
                sent.append(data)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        return sent

    (sent,) = asyncio.run(scenario())
    assert kinds(sent) == ["opened", "opened"]


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


def test_a_close_and_the_next_opening_reach_a_worker_in_one_message(store: LedgerStore, job_id: str) -> None:
    """Over real gRPC: after iteration 1 closes, the worker's next stream message carries the digest of
    its entry and then the opening of iteration 2."""

    async def scenario() -> pb.Announcement:
        async with with_workers(store, spec_text(job_id, population=4, iterations=2), 1, auto=False) as (c, (worker,)):
            await worker.join()
            stream = worker.stub.Subscribe(pb.SubscribeRequest(session=worker.session, from_index=1))
            await c.until_connected(1)
            await c.job.start()
            c.runner = asyncio.create_task(c.job.run())
            first = await stream.read()
            assert first.WhichOneof("kind") == "opened"
            await worker.submit([worker.batch(first.opened, list(first.opened.assigned))])
            return await stream.read()

    carrier = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
    assert [a.WhichOneof("kind") for a in unfold(carrier)] == ["compact", "opened"]
    assert carrier.then.opened.iteration == 2 and carrier.compact.index == 1
