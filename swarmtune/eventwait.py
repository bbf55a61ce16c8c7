"""Waiting for an asyncio event with a deadline, in the one way that never loses a cancellation."""

from __future__ import annotations

import asyncio


async def set_within(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait up to `seconds` (None: no limit) for `event`; whether it is set.

    Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives as the event is
    set, and the task that was being cancelled then runs on (a worker once waited forever after its
    connection was dropped). `asyncio.timeout` lets the cancellation through."""
    try:
        async with asyncio.timeout(None if seconds is None else max(0.0, seconds)):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()
