"""What a worker owes its coordinator (result batches, retention reports, attestations): sent paced, retried, drained at exit."""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Awaitable, Callable, TypeVar

import grpc

from swarmtune import entries
from swarmtune.entries import Attestation, Signed
from swarmtune.wire import service_pb2 as pb
from swarmtune.worker.backoff import Backoff
from swarmtune.worker.logs import EventLog
from swarmtune.worker.session import Connection, Joined, SessionLost, describe, retried
from swarmtune.worker.work import IterationWork
from swarmtune.eventwait import set_within

T = TypeVar("T")

SUBMIT_ATTEMPTS = 8
SUBMIT_BATCH = 4096  # members per signed batch (one batch per SubmitResults call)
# While more of our members are still to come, results go out at most this often (a dense member
# can take milliseconds: one call each would spend the coordinator's per-worker rate limit); the
# result that completes our share goes at once.
PARTIAL_SUBMIT_INTERVAL_S = 0.02
# Leaving (SIGTERM or the job's end): the coordinator may be gone already, so the last submissions
# are tried briefly: DRAIN_SEND_TIMEOUT_S plus DRAIN_ANSWERS times the slowest answer this worker has
# had (a call in flight, then the flush, each tried DRAIN_ATTEMPTS times), so a slow link or a busy
# coordinator still gets the final attestation; at most DRAIN_SEND_TIMEOUT_S + DRAIN_ANSWERS x CALL_TIMEOUT_S.
DRAIN_ATTEMPTS = 2
DRAIN_ANSWERS = 2 * DRAIN_ATTEMPTS
DRAIN_SEND_TIMEOUT_S = 3.0


class Outbox:
    """Sends the open iteration's untaken results and our attestations, oldest first.

    A call never waits for another's reply (gRPC multiplexes calls on the connection): on a wide-area
    link each reply is a round trip, and the result that completes our share must go out at once,
    not after the reply to an earlier partial submission or to an attestation. Results in flight are
    not sent twice; attestations go one at a time, in order, beside the results.

    The results live in the daemon's `IterationWork` (it survives reconnects); `current_work` reads it.
    """

    def __init__(
        self, current_work: Callable[[], IterationWork | None], stop: asyncio.Event, log: EventLog, backoff: Backoff, rng: random.Random
    ) -> None:
        self.current_work = current_work
        self.stop = stop  # once set, nothing more is coming: send at once
        self.log = log
        self.backoff = backoff
        self.rng = rng
        self.attestations: list[Signed[Attestation]] = []
        self.outgoing = asyncio.Event()  # new results or attestations to send
        self.in_flight: set[tuple[int, int]] = set()  # (iteration, member) of results sent and not answered
        self.retention_in_flight: set[int] = set()  # iterations whose retention report is out
        self.attesting = asyncio.Lock()  # attestations one at a time, in order
        self.calls: set[asyncio.Task[None]] = set()  # flushes started by send_forever, not done yet
        self.failure: BaseException | None = None  # the first of them that failed: ends the connection
        self.slowest_answer_s = 0.0  # the longest a call of ours waited for its answer (the drain's bound scales with it)

    def notify(self) -> None:
        """Something new to send (a result, a retention report, a fresh assignment to resend for)."""
        self.outgoing.set()

    def attest(self, signed: Signed[Attestation]) -> None:
        self.attestations.append(signed)
        self.notify()

    async def send_forever(self, connection: Connection, joined: Joined) -> None:
        """Flush on every notice; while more of our share is coming, at most once per PARTIAL_SUBMIT_INTERVAL_S.
        Each flush is a task of its own; the first that fails ends this (and the connection)."""
        self.reset()
        sent = -math.inf
        try:
            while True:
                await self.outgoing.wait()
                self.outgoing.clear()
                while self.more_coming() and (wait := sent + PARTIAL_SUBMIT_INTERVAL_S - time.monotonic()) > 0:
                    await set_within(self.outgoing, wait)
                    self.outgoing.clear()
                if self.failure is not None:
                    raise self.failure
                sent = time.monotonic()
                call = asyncio.create_task(self.flush(connection, joined))
                self.calls.add(call)
                call.add_done_callback(self._done)
        finally:
            self.reset()

    def _done(self, call: asyncio.Task[None]) -> None:
        self.calls.discard(call)
        if not call.cancelled() and call.exception() is not None and self.failure is None:
            self.failure = call.exception()
            self.outgoing.set()  # wake send_forever to raise it

    def reset(self) -> None:
        """A new connection: calls of the old one are abandoned (what they carried is sent again)."""
        for call in list(self.calls):
            call.cancel()
        self.calls.clear()
        self.in_flight.clear()
        self.retention_in_flight.clear()
        self.failure = None

    def more_coming(self) -> bool:
        """Members (or a retention report) of ours are still being evaluated this iteration."""
        work = self.current_work()
        return work is not None and not self.stop.is_set() and bool(work.pending() or work.retention_due())

    async def flush(self, connection: Connection, joined: Joined, attempts: int = SUBMIT_ATTEMPTS) -> None:
        """Send every result, retention report and attestation the coordinator has not taken yet."""
        work = self.current_work()
        sending = [self.send_results(connection, joined, work, attempts)] if work is not None else []
        if self.attestations and not self.attesting.locked():
            sending.append(self.send_attestations(connection, joined, attempts))
        for outcome in await asyncio.gather(*sending, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def send_results(self, connection: Connection, joined: Joined, work: IterationWork, attempts: int) -> None:
        members, retention = work.untaken()
        members = [m for m in members if (work.iteration, m) not in self.in_flight]
        retention = [] if work.iteration in self.retention_in_flight else retention
        if not members and not retention:
            return
        mine = {(work.iteration, m) for m in members}
        self.in_flight |= mine
        if retention:
            self.retention_in_flight.add(work.iteration)
        try:
            await self._send_results(connection, joined, work, attempts, members, retention)
        finally:  # answered: settled or rejected for good; failed: untaken still, sent again
            self.in_flight -= mine
            if retention:
                self.retention_in_flight.discard(work.iteration)

    async def _send_results(
        self, connection: Connection, joined: Joined, work: IterationWork, attempts: int, members: list[int], retention: list[bytes]
    ) -> None:
        # One signed batch per call, of at most SUBMIT_BATCH members: a big share stays under the per-call size limit.
        for start in range(0, max(len(members), len(retention)), SUBMIT_BATCH):
            chunk, sent = members[start : start + SUBMIT_BATCH], retention if start == 0 else []
            batches = [work.batch(chunk)] if chunk else []
            reply = await retried(lambda: self.answered(connection.submit(joined, batches, sent)), self.backoff, self.rng, attempts)
            for member, status in work.settle(chunk, reply, bool(sent)):
                what = "retention report" if member < 0 else f"member {member}"
                self.log("rejected", iteration=work.iteration, item=what, reason=pb.Reason.Name(status.reason), detail=status.detail)
            self.log("submitted", iteration=work.iteration, results=len(chunk), retention=len(sent))

    async def send_attestations(self, connection: Connection, joined: Joined, attempts: int) -> None:
        async with self.attesting:
            while self.attestations:
                signed = self.attestations[0]
                body = entries.encode_signed(signed)
                reply = await retried(lambda: self.answered(connection.attest(joined, body)), self.backoff, self.rng, attempts)
                self.attestations.pop(0)
                self.log("attested", iteration=signed.record.iteration, status=pb.Reason.Name(reply.status.reason))
        if self.attestations:  # one came while the last call was out, and its flush left it to us
            self.notify()

    async def answered(self, call: Awaitable[T]) -> T:
        """`call`'s answer, noting how long it took."""
        started = time.monotonic()
        reply = await call
        self.slowest_answer_s = max(self.slowest_answer_s, time.monotonic() - started)
        return reply

    def drain_bound_s(self) -> float:
        return DRAIN_SEND_TIMEOUT_S + DRAIN_ANSWERS * self.slowest_answer_s

    async def drain(self, connection: Connection, joined: Joined) -> None:
        """Before leaving: send what is still unsent, within drain_bound_s (the coordinator may be gone)."""
        try:
            async with asyncio.timeout(self.drain_bound_s()):
                if self.calls:  # what is in flight first: its results are not sent twice
                    await asyncio.wait(set(self.calls))
                if self.attesting.locked():
                    async with self.attesting:
                        pass
                await self.flush(connection, joined, DRAIN_ATTEMPTS)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, SessionLost) as exc:
            self.log("unsent_at_exit", reason=describe(exc))
