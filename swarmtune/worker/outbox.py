"""What a worker owes its coordinator (signed results, retention reports, attestations): sent paced, retried, drained at exit."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from typing import Callable

import grpc

from swarmtune import entries
from swarmtune.entries import Attestation, Signed
from swarmtune.wire import service_pb2 as pb
from swarmtune.worker.backoff import Backoff
from swarmtune.worker.logs import EventLog
from swarmtune.worker.session import Connection, Joined, SessionLost, describe, retried
from swarmtune.worker.work import IterationWork

SUBMIT_ATTEMPTS = 8
SUBMIT_BATCH = 1024  # results per SubmitResults call
# While more of our members are still to come, results go out at most this often (a dense member
# can take milliseconds: one call each would spend the coordinator's per-worker rate limit); the
# result that completes our share goes at once.
PARTIAL_SUBMIT_INTERVAL_S = 0.02
# Leaving (SIGTERM or the job's end): the coordinator may be gone already, so the last submissions
# are tried briefly.
DRAIN_ATTEMPTS = 2
DRAIN_SEND_TIMEOUT_S = 3.0


class Outbox:
    """Sends the open iteration's untaken results and our attestations, oldest first, one flush at a time.

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
        self.sending = asyncio.Lock()  # one flush at a time: each sends the oldest items first

    def notify(self) -> None:
        """Something new to send (a result, a retention report, a fresh assignment to resend for)."""
        self.outgoing.set()

    def attest(self, signed: Signed[Attestation]) -> None:
        self.attestations.append(signed)
        self.notify()

    async def send_forever(self, connection: Connection, joined: Joined) -> None:
        """Flush on every notice; while more of our share is coming, at most once per PARTIAL_SUBMIT_INTERVAL_S."""
        sent = -math.inf
        while True:
            await self.outgoing.wait()
            self.outgoing.clear()
            while self.more_coming() and (wait := sent + PARTIAL_SUBMIT_INTERVAL_S - time.monotonic()) > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.outgoing.wait(), wait)
                self.outgoing.clear()
            sent = time.monotonic()
            await self.flush(connection, joined)

    def more_coming(self) -> bool:
        """Members (or a retention report) of ours are still being evaluated this iteration."""
        work = self.current_work()
        return work is not None and not self.stop.is_set() and bool(work.pending() or work.retention_due())

    async def flush(self, connection: Connection, joined: Joined, attempts: int = SUBMIT_ATTEMPTS) -> None:
        """Send every result, retention report and attestation the coordinator has not taken yet."""
        async with self.sending:
            work = self.current_work()
            if work is not None:
                await self.send_results(connection, joined, work, attempts)
            await self.send_attestations(connection, joined, attempts)

    async def send_results(self, connection: Connection, joined: Joined, work: IterationWork, attempts: int) -> None:
        members, results, retention = work.untaken()
        # Batches of SUBMIT_BATCH: a big low-rank population stays under the coordinator's per-call limit.
        for start in range(0, max(len(results), len(retention)), SUBMIT_BATCH):
            batch, sent = results[start : start + SUBMIT_BATCH], retention if start == 0 else []
            reply = await retried(lambda: connection.submit(joined, batch, sent), self.backoff, self.rng, attempts)
            for member, status in work.settle(members[start : start + SUBMIT_BATCH], reply, bool(sent)):
                what = "retention report" if member < 0 else f"member {member}"
                self.log("rejected", iteration=work.iteration, item=what, reason=pb.Reason.Name(status.reason), detail=status.detail)
            self.log("submitted", iteration=work.iteration, results=len(batch), retention=len(sent))

    async def send_attestations(self, connection: Connection, joined: Joined, attempts: int) -> None:
        while self.attestations:
            signed = self.attestations[0]
            body = entries.encode_signed(signed)
            reply = await retried(lambda: connection.attest(joined, body), self.backoff, self.rng, attempts)
            self.attestations.pop(0)
            self.log("attested", iteration=signed.record.iteration, status=pb.Reason.Name(reply.status.reason))

    async def drain(self, connection: Connection, joined: Joined) -> None:
        """Before leaving: send what is still unsent, briefly (the coordinator may be gone)."""
        try:
            await asyncio.wait_for(self.flush(connection, joined, DRAIN_ATTEMPTS), DRAIN_SEND_TIMEOUT_S)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, SessionLost) as exc:
            self.log("unsent_at_exit", reason=describe(exc))
