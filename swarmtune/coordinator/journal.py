"""Group commit of accepted items to the open-iteration state in Redis: many submissions, one write."""

from __future__ import annotations

import asyncio
from typing import Mapping

from swarmtune.store import LedgerStore


class Journal:
    """`write` returns once the fields are stored; concurrent writers share one round trip."""

    def __init__(self, store: LedgerStore, job_id: str) -> None:
        self._store = store
        self._job_id = job_id
        self._pending: dict[bytes, bytes] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def write(self, fields: Mapping[bytes, bytes]) -> None:
        """Store `fields`; raises the store's error if Redis fails (nothing was acknowledged then)."""
        await self.post(fields)

    def post(self, fields: Mapping[bytes, bytes]) -> asyncio.Future[None]:
        """Queue `fields` for the next round trip without waiting; the future says when they are stored."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.update(fields)
        self._waiters.append(waiter)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return waiter

    async def drain(self) -> None:
        """Wait until everything written so far is stored (or has failed)."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)

    async def _flush(self) -> None:
        while self._waiters:
            batch, waiters = self._pending, self._waiters
            self._pending, self._waiters = {}, []
            try:
                await asyncio.to_thread(self._store.put_open, self._job_id, batch)
            except Exception as exc:  # every waiter learns of the failure; none is acknowledged
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
