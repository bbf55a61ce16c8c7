"""The job's lease in Redis: one active coordinator per job, renewed well inside its TTL; a standby waits
for it to lapse and takes over; a coordinator that cannot be sure it holds it stops writing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import AsyncIterator

from swarmtune.eventwait import set_within
from swarmtune.store import LEASE_KEY, LeaseLost, LedgerStore, StoreError, StoreUnreachable

log = logging.getLogger("swarmtune.coordinator")

RELEASE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class LeaseTimings:
    """The lease's TTL and what follows from it (docs/PROTOCOL.md §6.8)."""

    ttl_s: float = 10.0

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    @property
    def renew_every_s(self) -> float:
        """Two renewals may fail (or be late) before the lease is in danger."""
        return self.ttl_s / 3

    @property
    def margin_s(self) -> float:
        """Writes stop this long before an unrenewed lease would lapse: an append in flight then still
        reaches Redis while the lease is ours, whatever a standby does once it lapses."""
        return min(1.0, self.ttl_s / 5)

    @property
    def poll_s(self) -> float:
        """How often a standby asks for the lease."""
        return min(1.0, self.ttl_s / 4)

    @property
    def takeover_bound_s(self) -> float:
        """From the active coordinator's death until a standby holds the lease, at most."""
        return self.ttl_s + self.poll_s


def holder_token(listen: str) -> str:
    """Who holds the lease, for the logs of a standby, and unique to this process and start."""
    return f"{socket.gethostname()}:{os.getpid()}:{listen}:{secrets.token_hex(6)}"


class Lease:
    """This process's claim on a job: `acquire` (standing by while another holds it), `keep` (renew
    until it is lost), `check` (before every write), `release`."""

    def __init__(self, store: LedgerStore, job_id: str, token: str, timings: LeaseTimings) -> None:
        self._store = store
        self.job_id = job_id
        self.token = token
        self.timings = timings
        self._valid_until = 0.0  # monotonic: the send time of the last granted take or renewal + TTL
        self.lost = asyncio.Event()
        self.why = ""

    @property
    def key(self) -> str:
        return LEASE_KEY.format(job=self.job_id)

    def remaining_s(self) -> float:
        return self._valid_until - time.monotonic()

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Take the lease, standing by while another coordinator holds it; False if `stop` came first."""
        started = time.monotonic()
        seen: tuple[str | None, bool] | None = None  # (holder, Redis reachable), logged on each change
        while not stop.is_set():
            sent = time.monotonic()
            try:
                state = await asyncio.to_thread(self._store.take_lease, self.job_id, self.token, self.timings.ttl_ms)
            except StoreUnreachable as exc:
                if seen is None or seen[1]:
                    log.warning("standing by; Redis unreachable, still asking", extra={"job": self.job_id, "error": str(exc)})
                seen = (seen[0] if seen else None, False)
            else:
                if state.taken:
                    self._valid_until = sent + self.timings.ttl_s
                    waited = time.monotonic() - started
                    log.info("lease acquired", extra={"job": self.job_id, "key": self.key, "ttl_s": self.timings.ttl_s, "waited_s": round(waited, 3)})
                    return True
                if state.holder is not None and seen != (state.holder, True):
                    self._log_standby(state.holder, state.remaining_ms)
                seen = (state.holder, True)
            if await set_within(stop, self.timings.poll_s):
                break
        return False

    def _log_standby(self, holder: str, remaining_ms: int) -> None:
        if remaining_ms < 0:
            log.warning(
                "standing by behind a lease with no expiry",
                extra={"job": self.job_id, "holder": holder, "advice": f"if no coordinator runs the job, DEL {self.key}"},
            )
            return
        log.info(
            "standing by",
            extra={"job": self.job_id, "holder": holder, "expires_in_s": remaining_ms / 1000, "poll_s": self.timings.poll_s},
        )

    def check(self) -> None:
        """Raise LeaseLost unless the lease is surely ours a margin longer (run before every write)."""
        if self.lost.is_set() or self.remaining_s() < self.timings.margin_s:
            raise LeaseLost(self.describe_loss())

    def describe_loss(self) -> str:
        why = self.why or f"not renewed within {self.timings.ttl_s - self.timings.margin_s:g} s"
        return (
            f"this coordinator lost the lease of job {self.job_id!r} ({why}): another coordinator may run the "
            "job now, so this one writes nothing more and stops; restart it to stand by"
        )

    def lose(self, why: str) -> None:
        """Mark the lease lost (once, logged as an error): the coordinator then stops. On the event loop."""
        if not self.lost.is_set():
            self.why = why
            self.lost.set()
            log.error("lease lost; stopping without writing", extra={"job": self.job_id, "reason": why})

    async def keep(self) -> None:
        """Renew every third of the TTL (retrying sooner after a failure) until the lease is lost."""
        delay = self.timings.renew_every_s
        while not self.lost.is_set():
            await asyncio.sleep(delay)
            left = self.remaining_s() - self.timings.margin_s
            if left <= 0:  # e.g. this process was paused: a standby may hold the lease by now
                since = self.timings.ttl_s - left - self.timings.margin_s
                self.lose(f"not renewed in time: the last renewal was {since:.1f} s ago (was this process paused?)")
                return
            sent = time.monotonic()
            try:
                async with asyncio.timeout(left):  # not wait_for: it can lose a cancellation (eventwait.py)
                    held = await asyncio.to_thread(self._store.keep_lease, self.job_id, self.token, self.timings.ttl_ms)
            except (StoreError, TimeoutError) as exc:
                log.warning("lease not renewed; retrying", extra={"job": self.job_id, "error": str(exc) or "timed out", "left_s": round(left, 3)})
                delay = min(self.timings.renew_every_s, self.timings.margin_s)
                continue
            if not held:
                self.lose("Redis says another coordinator holds it, or it lapsed")
                return
            self._valid_until = sent + self.timings.ttl_s
            delay = self.timings.renew_every_s

    async def release(self) -> None:
        """Give the lease up if it is still ours (a standby takes over at once); never raises."""
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                released = await asyncio.to_thread(self._store.keep_lease, self.job_id, self.token, 0)
        except (StoreError, TimeoutError) as exc:
            log.warning("lease not released; it lapses by itself", extra={"job": self.job_id, "error": str(exc) or "timed out"})
            return
        if released:
            log.info("lease released", extra={"job": self.job_id})


@contextlib.asynccontextmanager
async def kept(lease: Lease) -> AsyncIterator[Lease]:
    """Renew `lease` in the background for the body's duration, then release it."""
    keeper = asyncio.create_task(lease.keep())
    try:
        yield lease
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await lease.release()
