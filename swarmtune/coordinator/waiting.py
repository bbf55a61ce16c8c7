"""Waiting at start-up: for Redis, with capped exponential backoff and each try logged; a signal ends any wait."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from swarmtune.eventwait import set_within
from swarmtune.store import LedgerStore, StoreUnreachable, redact

log = logging.getLogger("swarmtune.coordinator")


@dataclass(frozen=True)
class RedisWait:
    """Try n (n = 1, 2, ...) that fails is followed by a pause of min(cap, first·2^(n-1)) seconds; no
    jitter: one coordinator per job (and its standby) cannot stampede Redis. `limit_s` None: forever."""

    limit_s: float | None = None
    first_s: float = 0.5
    cap_s: float = 30.0

    def delay_s(self, attempt: int) -> float:
        return min(self.cap_s, self.first_s * 2.0 ** min(attempt - 1, 32))


async def wait_for_store(connect: Callable[[], LedgerStore], url: str, wait: RedisWait, stop: asyncio.Event) -> LedgerStore | None:
    """`connect()` once Redis answers (None if `stop` is set first). Only an unreachable server is
    waited for: refused credentials, a certificate that does not verify or a bad URL fail at once."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            store = await asyncio.to_thread(connect)
        except StoreUnreachable as exc:
            waited = time.monotonic() - started
            if wait.limit_s is not None and waited >= wait.limit_s:
                raise StoreUnreachable(f"{exc}; gave up after {attempt} tries in {waited:.1f} s (--redis-wait {wait.limit_s:g})") from None
            delay = wait.delay_s(attempt)
            if wait.limit_s is not None:
                delay = min(delay, wait.limit_s - waited)  # one last try at the limit
            log.warning(
                "waiting for Redis",
                extra={"url": redact(url), "attempt": attempt, "next_delay_s": round(delay, 3), "waited_s": round(waited, 3), "error": str(exc)},
            )
            if await set_within(stop, delay):
                return None
            continue
        if attempt > 1:
            log.info("Redis reachable", extra={"url": redact(url), "attempt": attempt, "waited_s": round(time.monotonic() - started, 3)})
        return store
