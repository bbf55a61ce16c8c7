"""set_within: an event waited for with a deadline, and a cancellation never lost."""

from __future__ import annotations

import asyncio

import pytest

from swarmtune.eventwait import set_within


def test_set_event_and_timeout() -> None:
    async def run() -> tuple[bool, bool, bool]:
        unset, ready = asyncio.Event(), asyncio.Event()
        ready.set()
        later = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, later.set)
        return await set_within(unset, 0.01), await set_within(ready, 0), await set_within(later, None)

    assert asyncio.run(run()) == (False, True, True)


def test_a_cancel_that_meets_the_event_being_set_is_not_lost() -> None:
    """The race asyncio.wait_for loses on 3.11: the event is set and the waiter cancelled in one step."""

    async def run() -> None:
        for _ in range(50):
            event = asyncio.Event()
            waiter = asyncio.create_task(set_within(event, 10.0))
            await asyncio.sleep(0)
            event.set()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter

    asyncio.run(asyncio.wait_for(run(), 30))
