"""The worker's outbox: pacing only while more of our share is coming, and a bounded drain when the coordinator is gone."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from functools import partial

from swarmtune import batches, entries, identity
from swarmtune.entries import Attestation, NoisePlan
from swarmtune.worker.backoff import Backoff
from swarmtune.worker.logs import EventLog
from swarmtune.worker.outbox import DRAIN_ANSWERS, DRAIN_SEND_TIMEOUT_S, Outbox
from swarmtune.worker.session import Connection, Joined, open_channel
from swarmtune.worker.work import IterationWork, Opened


def test_more_is_coming_while_members_are_pending_and_not_once_stopping() -> None:
    work = IterationWork(Opened(3, b"h" * 32, NoisePlan(1, 2, True), False), partial(batches.sign_batch, identity.generate_key(), "job", 3, b"h" * 32))
    stop = asyncio.Event()
    outbox = Outbox(lambda: work, stop, EventLog(True, io.StringIO()), Backoff(), random.Random(0))
    assert not outbox.more_coming()  # nothing assigned to us
    work.assign([0, 1])
    assert outbox.more_coming()
    stop.set()
    assert not outbox.more_coming()  # leaving: what we have goes at once


def test_drain_gives_up_briefly_when_the_coordinator_is_gone_and_keeps_what_it_could_not_send() -> None:
    key = identity.generate_key()
    out = io.StringIO()
    attestation = entries.sign_record(key, Attestation("job", 2, b"s" * 32, identity.public_key_bytes(key)))

    async def scenario() -> float:
        outbox = Outbox(lambda: None, asyncio.Event(), EventLog(True, out), Backoff(), random.Random(0))
        outbox.attest(attestation)
        connection = Connection(open_channel("127.0.0.1:1", None))  # nothing listens there
        started = time.monotonic()
        try:
            await outbox.drain(connection, Joined(b"token", "job", b"g" * 32, 0))
        finally:
            await connection.close()
        assert outbox.attestations == [attestation]
        return time.monotonic() - started

    seconds = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert seconds < DRAIN_SEND_TIMEOUT_S + 1.0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["unsent_at_exit"]


def test_the_drain_bound_grows_with_the_slowest_answer_the_coordinator_gave() -> None:
    async def scenario() -> Outbox:
        outbox = Outbox(lambda: None, asyncio.Event(), EventLog(True, io.StringIO()), Backoff(), random.Random(0))
        assert outbox.drain_bound_s() == DRAIN_SEND_TIMEOUT_S  # nothing measured: the floor
        await outbox.answered(asyncio.sleep(0.01, "quick"))
        assert await outbox.answered(asyncio.sleep(0.2, "slow")) == "slow"
        await outbox.answered(asyncio.sleep(0.01, "quick"))
        return outbox

    outbox = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert 0.2 <= outbox.slowest_answer_s < 1.0
    assert outbox.drain_bound_s() == DRAIN_SEND_TIMEOUT_S + DRAIN_ANSWERS * outbox.slowest_answer_s
