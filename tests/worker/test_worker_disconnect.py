"""A dropped connection ends the worker's helpers at once: no cancel is lost, however it meets other events."""

from __future__ import annotations

import asyncio
import io
import random
from functools import partial

import pytest

from swarmtune import batches, identity
from swarmtune.entries import NoisePlan
from swarmtune.worker import outbox as outbox_module
from swarmtune.worker.backoff import Backoff
from swarmtune.worker.logs import EventLog
from swarmtune.worker.outbox import Outbox
from swarmtune.worker.session import Connection, Joined, open_channel
from swarmtune.worker.work import IterationWork, Opened


def test_the_outbox_ends_when_cancelled_as_something_new_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon cancels `send_forever` when the connection drops; if a result or a failed call's notice
    arrives in the same instant (both come of the drop), the cancel must still end it. (asyncio.wait_for
    swallowed it on Python 3.11: the worker then never logged "disconnected".)"""
    monkeypatch.setattr(outbox_module, "PARTIAL_SUBMIT_INTERVAL_S", 60.0)  # it waits in the pacing loop
    work = IterationWork(Opened(3, b"h" * 32, NoisePlan(1, 2, True), False), partial(batches.sign_batch, identity.generate_key(), "job", 3, b"h" * 32))
    work.assign([0, 1])

    async def scenario() -> None:
        outbox = Outbox(lambda: work, asyncio.Event(), EventLog(True, io.StringIO()), Backoff(), random.Random(0))
        connection = Connection(open_channel("127.0.0.1:1", None))  # nothing listens there
        try:
            sending = asyncio.create_task(outbox.send_forever(connection, Joined(b"token", "job", b"g" * 32, 0)))
            outbox.notify()  # the first flush goes at once
            await asyncio.sleep(0.05)
            outbox.notify()  # the next waits for the pacing interval, more of our share being due
            await asyncio.sleep(0.05)
            outbox.notify()
            sending.cancel()
            done, _ = await asyncio.wait({sending}, timeout=2.0)
            assert done == {sending} and sending.cancelled()
            assert not outbox.calls  # the flush in flight was abandoned with the connection
        finally:
            await connection.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
