"""Catching up: fetch the entries a worker does not hold yet, verify and apply them in ledger order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from swarmtune.entries import StoredEntry
from swarmtune.wire import service_pb2 as pb
from swarmtune.worker.site import Site

# Runs a blocking function on the thread that owns the model and the replica.
Compute = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class CaughtUp:
    """Where catching up left the site: the last iteration applied, and what it took."""

    site: Site
    iterations_applied: int
    seconds: float


async def catch_up(
    entries: AsyncIterator[pb.LedgerEntry],
    site: Site | None,
    compute: Compute,
    open_genesis: Callable[[bytes], Site],
    seen: Callable[[StoredEntry], None],
    stopping: Callable[[], bool],
) -> CaughtUp | None:
    """Verify and apply `entries` (from genesis when there is no site yet); `seen` checks each applied
    entry. None when the ledger is still empty or the worker is stopping."""
    # Counted by the site: a replica restored from a snapshot verifies the iterations before it without applying them.
    started, applied_before = time.perf_counter(), site.applied if site is not None else 0
    async for item in entries:
        if stopping():
            return None
        if site is None:
            site = await compute(open_genesis, item.stored)
            continue
        entry = await compute(site.accept, item.stored)
        seen(entry)
    if site is None:
        return None
    return CaughtUp(site, site.applied - applied_before, time.perf_counter() - started)
