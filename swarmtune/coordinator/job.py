"""The running job: sessions, the open iteration, submissions, closes and announcements (no gRPC here)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import identity
from swarmtune.coordinator import assignment, lifecycle, validation
from swarmtune.coordinator.broadcast import Broadcaster, End, Outgoing, Subscriber, announce, entry_outgoing
from swarmtune.coordinator.chain import Chain, History, now_ms
from swarmtune.coordinator.close import Closing, build_iteration, retention_alerts
from swarmtune.coordinator.journal import Journal
from swarmtune.coordinator.metrics import Metrics
from swarmtune.coordinator.redundancy import strikes, to_revoke
from swarmtune.coordinator.round import META_FIELD, Round, result_field, retention_field
from swarmtune.coordinator.sessions import Challenges, Session, Sessions, full_bucket
from swarmtune.coordinator.status import IterationFigures, WorkerStats, alerts_of, figures_of, summary_message, worker_message
from swarmtune.coordinator.validation import Checked
from swarmtune.entries import Admission, Body, Revocation, Signed, StoredEntry, WorkerResult
from swarmtune.jobspec import JobSpec
from swarmtune.join import JoinError, open_join_request
from swarmtune.store import LedgerStore, StoreError
from swarmtune.wire import ledger_pb2
from swarmtune.wire import service_pb2 as pb

log = logging.getLogger("swarmtune.coordinator")

FETCH_BATCH = 256
IDLE_TICK_S = 1.0


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one worker (or a crowd of them) from exhausting the coordinator."""

    max_results_per_call: int = 4096  # a 2 MiB request holds this many ~170-byte results with room to spare
    max_retention_per_call: int = 16
    calls_per_s: float = 100.0  # per worker: submissions and attestations together (a fast worker makes ~2 an iteration)
    call_burst: float = 200.0
    joins_per_s: float = 500.0  # all workers together: challenges and joins verify signatures
    join_burst: float = 2000.0
    challenges: int = 10_000  # outstanding join nonces
    challenge_lifetime_s: float = 60.0
    queue_limit: int = 1024  # unread announcements before a subscriber is cut loose


class Refused(Exception):
    """A whole call refused; `code` names the gRPC status (e.g. "UNAUTHENTICATED")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def reason_name(reason: int) -> str:
    return pb.Reason.Name(reason)


def _warn_if_unstored(stored: asyncio.Future[None]) -> None:
    if not stored.cancelled() and stored.exception() is not None:
        log.warning("the open iteration's state was not stored; a restart reopens it afresh", extra={"error": str(stored.exception())})


def entry_announcement(stored: StoredEntry) -> Outgoing:
    return entry_outgoing(stored.entry.index, stored.stored)


class Job:
    """One job's coordinator state machine; the gRPC servicer is a thin layer over its methods."""

    def __init__(
        self,
        spec: JobSpec,
        store: LedgerStore,
        key: Ed25519PrivateKey,
        chain: Chain,
        reward_range: tuple[float, float],
        open_enrollment: bool,
        limits: Limits = Limits(),
        metrics: Metrics | None = None,
        min_workers: int = 1,
    ) -> None:
        self.spec = spec
        self.limits = limits
        self.min_workers = min_workers
        self.metrics = metrics or Metrics()
        self._store = store
        self._key = key
        self._chain = chain
        self._reward_range = reward_range
        self._open_enrollment = open_enrollment
        self._journal = Journal(store, spec.job_id)
        self._challenges = Challenges(limits.challenges, limits.challenge_lifetime_s)
        self._join_bucket = full_bucket(limits.joins_per_s, limits.join_burst, time.monotonic())
        self._sessions = Sessions(limits.calls_per_s, limits.call_burst)
        self._broadcast = Broadcaster(limits.queue_limit)
        self._workers: dict[bytes, WorkerStats] = {}
        self._round: Round | None = None
        self._recorded: dict[bytes, dict[int, bytes]] = {}  # worker -> member -> bytes in the last iteration entry
        self._wake = asyncio.Event()
        self._paused = False
        self._opened_once = False  # --min-workers holds back only the first iteration this process opens
        self._waiting_for_workers = False
        self.finished = asyncio.Event()

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def history(self) -> History:
        return self._chain.history

    async def start(self) -> None:
        """Resume the open iteration Redis holds, or open the next one (or finish)."""
        fields = await asyncio.to_thread(self._store.get_open, self.spec.job_id)
        meta = fields.get(META_FIELD)
        if meta is not None:
            resumed = lifecycle.resume_iteration(self.spec, meta, now_ms())
            if resumed.iteration == self.history.last_iteration + 1:
                self._round = Round(resumed, self.spec.redundancy, self.spec.redundancy_tolerance)
                taken = self._round.restore(fields)
                self._round.retention_worker = next(iter(self._round.retention), None)
                self._opened_once = True
                self.metrics.iteration.set(resumed.iteration)
                log.info("resumed iteration", extra={"iteration": resumed.iteration, "results": taken})
                for key in self._broadcast.connected():  # workers that subscribed while we read Redis
                    self._greet(key)
                return
            await asyncio.to_thread(self._store.delete_open, self.spec.job_id)
        await self._advance()

    async def run(self) -> None:
        """Drive deadlines, straggler re-assignment and closes until the job is finished."""
        while not self.finished.is_set():
            self._wake.clear()
            timeout = self._next_timer_s()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            await self._tick()

    def _next_timer_s(self) -> float:
        current = self._round
        if current is None or current.closing:
            return IDLE_TICK_S
        now = now_ms()
        upcoming = [t for t in (current.open.straggle_ms, current.open.deadline_ms) if t > now]
        return min([IDLE_TICK_S, *((t - now) / 1000 for t in upcoming)])

    async def _tick(self) -> None:
        current = self._round
        if current is None and self._waiting_for_workers and len(self._candidates()) >= self.min_workers:
            await self._advance()
            return
        if current is None or current.closing:
            return
        now = now_ms()
        if self._may_close(current, now):
            await self._close(current)
        elif now >= current.open.deadline_ms:
            current.open = lifecycle.extend_deadline(current.open, self.spec, now)
            current.stolen.clear()
            log.warning(
                "deadline passed without quorum; extended",
                extra={"iteration": current.open.iteration, "settled": len(current.settled), "quorum": lifecycle.quorum_members(self.spec)},
            )
            self._reconcile(current)
        else:
            self._reconcile(current)

    def _may_close(self, current: Round, now: int) -> bool:
        awaiting_retention = current.retention_worker is not None and not current.retention
        if awaiting_retention and now < current.open.deadline_ms:
            return False
        return lifecycle.may_close(self.spec, len(current.settled), now, current.open.deadline_ms)

    async def _advance(self) -> None:
        """After a close (or at start): finish, pause, or open the next iteration."""
        last = self.history.last_iteration
        if last >= self.spec.iterations:
            self._finish("completed")
        elif self._paused:
            log.warning("job paused by a retention alert; restart the coordinator to continue", extra={"iteration": last})
        elif not self._opened_once and len(self._candidates()) < self.min_workers:
            if not self._waiting_for_workers:
                log.info("waiting for workers before the first iteration", extra={"iteration": last + 1, "min_workers": self.min_workers})
            self._waiting_for_workers = True
        else:
            self._waiting_for_workers = False
            self._opened_once = True
            await self._open(last + 1)

    def _finish(self, reason: str) -> None:
        finished = pb.JobFinished(last_iteration=self.history.last_iteration, head_index=self._chain.head.entry.index, reason=reason)
        self._broadcast.publish(announce(pb.Announcement(finished=finished)))
        self._broadcast.publish(End(f"job finished: {reason}"))
        self.finished.set()
        log.info("job finished", extra={"iteration": self.history.last_iteration, "reason": reason})

    async def await_final_attestations(self, timeout_s: float) -> None:
        """After the last close, give the workers of that iteration a moment to attest their final
        state (workers attest after the last iteration); stops early once all of them have."""
        last = self.history.last_iteration
        if not self.spec.attestation_due(last):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(last in self.history.attested.get(key, {}) for key in self._recorded):
                return
            await asyncio.sleep(0.1)
        log.warning("final attestations incomplete", extra={"iteration": last, "timeout_s": timeout_s})

    def stop(self, reason: str) -> None:
        """End every subscription (the process is going away; workers reconnect to its successor)."""
        self._broadcast.publish(End(reason))

    async def _open(self, iteration: int) -> None:
        opened = lifecycle.open_iteration(self.spec, iteration, self._chain.head.hash, now_ms())
        # Announced without waiting for Redis: an iteration is a pure function of (job, t, head), so a
        # restart that finds no meta reopens the same one, and every result signed for it still counts.
        self._journal.post({META_FIELD: lifecycle.encode_open_meta(opened)}).add_done_callback(_warn_if_unstored)
        candidates = self._candidates()
        target = self._target(candidates)
        current = Round(opened, target, self.spec.redundancy_tolerance)
        members = [m.member for m in opened.members]
        for key, assigned in assignment.assign(members, candidates, target, rotation=iteration).items():
            current.give(key, assigned)
        if self.spec.retention_due(iteration) and candidates:
            current.retention_worker = min(candidates, key=lambda c: (current.load(c.key), c.key)).key
        self._round = current
        for key in self._broadcast.connected():
            self._announce_open(current, key)
        self.metrics.iteration.set(iteration)
        log.info("iteration opened", extra={"iteration": iteration, "workers": len(candidates), "replicas": target})

    def _announce_open(self, current: Round, key: bytes) -> None:
        """The iteration's common part (serialized once per round) followed by this worker's part:
        protobuf merges repeated occurrences of a message field, so the concatenation parses as one."""
        opened = current.open
        if current.opened_bytes is None:
            common = pb.IterationOpened(
                iteration=opened.iteration,
                head_hash=opened.head_hash,
                members=[ledger_pb2.MemberNoise(member=m.member, seed=m.seed, sign=m.sign) for m in opened.members],
            )
            current.opened_bytes = pb.Announcement(opened=common).SerializeToString()
        own = pb.IterationOpened(
            assigned=current.pending(key),
            deadline_ms=opened.deadline_ms,
            measure_retention=current.retention_worker == key and key not in current.retention,
        )
        data = current.opened_bytes + pb.Announcement(opened=own).SerializeToString()
        self._broadcast.send(key, Outgoing(data, opened=opened.iteration))

    def _candidates(self) -> list[assignment.Candidate]:
        out = []
        for key in self._broadcast.connected():
            session = self._sessions.current(key)
            if session is not None and key not in self.history.revoked:
                out.append(assignment.Candidate(key, session.operator, session.capacity))
        return out

    def _target(self, candidates: Sequence[assignment.Candidate]) -> int:
        """Replicas per member: k, capped by the distinct operators connected (k while none is)."""
        return assignment.effective_replicas(self.spec.redundancy, candidates) if candidates else self.spec.redundancy

    def _reconcile(self, current: Round) -> None:
        """Give members that lack holders to connected workers (after the straggle point, idle ones too)."""
        if current.closing:
            return
        candidates = self._candidates()
        current.retarget(self._target(candidates))
        needs = current.needs()
        straggling = current.straggling() if now_ms() >= current.open.straggle_ms else {}
        connected = {c.key for c in candidates}
        retention_moved = self._move_retention(current, connected)
        if not needs and not straggling and not retention_moved:
            return
        load = {c.key: current.load(c.key) for c in candidates}
        holders = {m: frozenset(current.holders.get(m, ())) for m in {*needs, *straggling}}
        added = assignment.reassign(needs, holders, candidates, load)
        if straggling:
            idle = [c for c in candidates if load[c.key] == 0 and c.key not in added]
            stolen = assignment.reassign(straggling, holders, idle, load)
            for key, members in stolen.items():
                current.stolen.update(members)
                added[key] = tuple(sorted({*added.get(key, ()), *members}))
        for key, members in added.items():
            current.give(key, members)
        for key in set(added) | ({retention_moved} if retention_moved else set()):
            if self._broadcast.announced(key, current.open.iteration):
                message = pb.Reassignment(
                    iteration=current.open.iteration,
                    added=added.get(key, ()),
                    deadline_ms=current.open.deadline_ms,
                    measure_retention=key == retention_moved,
                )
                self._broadcast.send(key, announce(pb.Announcement(reassigned=message)))
        if added:
            log.info("members re-assigned", extra={"iteration": current.open.iteration, "members": sum(map(len, added.values()))})

    def _move_retention(self, current: Round, connected: set[bytes]) -> bytes | None:
        """A new retention worker when the one asked is gone before reporting."""
        due = self.spec.retention_due(current.open.iteration)
        if not due or current.retention or not connected or current.retention_worker in connected:
            return None
        current.retention_worker = min(connected)
        return current.retention_worker

    # ---- closing --------------------------------------------------------------------------

    def _record(self, body: Body) -> StoredEntry:
        """Append an entry and announce it, with no await in between (see Chain)."""
        stored = self._chain.append(body)
        self._broadcast.publish(entry_announcement(stored))
        return stored

    def _build(self, current: Round) -> Closing:
        revoked = frozenset(self.history.revoked)
        reports = [signed for key, (signed, _) in sorted(current.retention.items()) if key not in revoked]
        alerts, _ = retention_alerts(reports, self.history.baselines, self.spec.retention_alert_threshold)
        return build_iteration(self.spec, current.open, current.all_results(), revoked, reports, alerts)

    async def _close(self, current: Round) -> None:
        """Revoke whoever the replicas outvoted too often, then shape, seal, append and broadcast."""
        current.closing = True
        settled_ms = current.settled_ms or now_ms()
        try:
            closing, stored = await self._seal(current)
        except Exception as exc:
            if current.appended is not None:
                current.appended.set_exception(exc)
            raise
        if current.appended is not None:
            current.appended.set_result(None)
        alerts = closing.body.alerts
        done = now_ms()
        figures = figures_of(
            closing.body,
            evaluation_s=(settled_ms - current.open.opened_ms) / 1000,
            overhead_s=(done - settled_ms) / 1000,
            wall_s=(done - current.open.opened_ms) / 1000,
        )
        self.history.figures[-1] = figures  # the same figures, now with this close's timing
        self._recorded = {}
        for signed in closing.body.results:
            key, member = signed.record.worker_key, signed.record.member
            self._recorded.setdefault(key, {})[member] = current.raw[key][member]
        self._round = None
        self._observe_close(figures)
        log.info(
            "iteration closed",
            extra={
                "iteration": closing.body.iteration,
                "index": stored.entry.index,
                "rewarded": len(figures.rewarded),
                "reward_mean": sum(figures.rewarded) / max(1, len(figures.rewarded)),
                "close_ms": done - settled_ms,
            },
        )
        if alerts:
            log.warning("retention alert", extra={"iteration": closing.body.iteration, "alerts": list(alerts)})
            self._paused = self.spec.pause_on_alert
        # Let the subscription streams take the entry before the next opening: every worker's
        # verify-and-apply then overlaps the opening instead of following it.
        await asyncio.sleep(0)
        await self._advance()

    async def _seal(self, current: Round) -> tuple[Closing, StoredEntry]:
        """The iteration entry, appended (after any revocation it brings)."""
        await self._journal.drain()
        closing = self._build(current)
        self.history.strikes.update(strikes(closing.verdicts.values()))
        revoking = to_revoke(self.history.strikes, self.spec.revoke_after, frozenset(self.history.revoked))
        for key in revoking:
            self._revoke(key, self.history.strikes[key])
        if revoking:  # their results stop counting, in this iteration too
            closing = self._build(current)
        return closing, self._record(closing.body)

    def _observe_close(self, figures: IterationFigures) -> None:
        m = self.metrics
        m.iterations_closed.inc()
        m.close_seconds.observe(figures.overhead_s)
        m.evaluation_seconds.set(figures.evaluation_s)
        if figures.rewarded:
            m.reward_mean.set(sum(figures.rewarded) / len(figures.rewarded))
            m.reward_max.set(max(figures.rewarded))
        for name, value in figures.retention:
            m.retention.labels(figure=name).set(value)

    def _revoke(self, key: bytes, count: int) -> None:
        operator = self.history.operators.get(key) or (self._workers[key].operator if key in self._workers else "")
        reason = f"disagreed with the majority of redundant replicas {count} times (threshold {self.spec.revoke_after})"
        self._record(Revocation(key, reason, operator))
        self._broadcast.send(key, End("worker key revoked"))
        self._sessions.close(key)
        self.metrics.revocations.inc()
        log.warning("worker revoked", extra={"worker": identity.fingerprint(key), "reason": reason})

    # ---- joining --------------------------------------------------------------------------

    def _charge_join(self) -> None:
        bucket = self._join_bucket.take(time.monotonic())
        if bucket is None:
            raise Refused("RESOURCE_EXHAUSTED", f"more than {self.limits.joins_per_s:.0f} joins per second; retry with backoff")
        self._join_bucket = bucket

    async def challenge(self) -> pb.Challenge:
        self._charge_join()
        issued = self._challenges.issue(time.time())
        if issued is None:
            raise Refused("RESOURCE_EXHAUSTED", "too many join challenges outstanding; retry in a few seconds")
        nonce, expires_s = issued
        return pb.Challenge(
            nonce=nonce, job_id=self.spec.job_id, genesis_hash=self.history.genesis_hash, expires_ms=int(expires_s * 1000)
        )

    async def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        self._charge_join()
        try:
            proof = open_join_request(request)
        except JoinError as exc:
            raise Refused("UNAUTHENTICATED", str(exc)) from None
        if proof.job_id != self.spec.job_id:
            raise Refused("FAILED_PRECONDITION", f"this coordinator runs job {self.spec.job_id!r}, not {proof.job_id!r}")
        if not self._challenges.redeem(proof.nonce, time.time()):
            raise Refused("UNAUTHENTICATED", "unknown, used or expired nonce; call GetChallenge and join again at once")
        key, who = proof.worker_key, identity.fingerprint(proof.worker_key)
        if key in self.history.revoked:
            raise Refused("PERMISSION_DENIED", f"worker {who} is revoked in this job's ledger")
        operator = proof.operator_id or who  # no declared operator: the worker is its own operator
        if key not in self.history.admitted:
            if not self._open_enrollment:
                raise Refused("PERMISSION_DENIED", f"worker {who} is not admitted; ask the operator to --admit {key.hex()}")
            self._record(Admission(key, "open enrollment", operator))
        session = self._sessions.open(key, operator, proof.capacity, time.monotonic())
        self._broadcast.send(key, End("the worker joined again"))
        self._workers[key] = WorkerStats(operator, proof.capacity, last_seen_ms=now_ms())
        log.info("worker joined", extra={"worker": who, "operator": operator, "capacity": proof.capacity})
        head = self._chain.head
        return pb.JoinReply(
            session=session.token,
            worker_id=who,
            job_id=self.spec.job_id,
            genesis_hash=self.history.genesis_hash,
            head_index=head.entry.index,
            coordinator_key=identity.public_key_bytes(self._key),
        )

    def _session(self, token: bytes, charge: bool) -> Session:
        session = self._sessions.get(token)
        if session is None:
            raise Refused("UNAUTHENTICATED", "unknown session (the coordinator restarted, or you joined again); join again")
        if charge and not self._sessions.allow(session, time.monotonic()):
            raise Refused(
                "RESOURCE_EXHAUSTED",
                f"rate limit: at most {self.limits.calls_per_s:.0f} calls/s per worker; batch results and back off",
            )
        return session

    # ---- announcements --------------------------------------------------------------------

    async def subscribe(self, token: bytes, from_index: int) -> AsyncIterator[bytes]:
        """Entries from `from_index` to the head, then live announcements (serialized Announcements)."""
        session = self._session(token, charge=True)
        head = self._chain.head.entry.index
        if from_index > head + 1:
            raise Refused("OUT_OF_RANGE", f"from_index {from_index} is beyond this ledger's head {head}: is this the job you replayed?")
        subscriber = self._broadcast.add(session.key)
        self.metrics.workers_connected.set(len(self._broadcast.connected()))
        try:
            sent = from_index - 1
            async for entry in self.read_entries(from_index, head + 1):
                yield entry_outgoing(entry.index, entry.stored).data
                sent = entry.index
            if self.finished.is_set():
                finished = pb.JobFinished(last_iteration=self.history.last_iteration, head_index=sent, reason="completed")
                yield pb.Announcement(finished=finished).SerializeToString()
                return
            self._greet(session.key)
            if self._waiting_for_workers:
                self._wake.set()
            async for message in self._drain(subscriber):
                if message.index is not None and message.index <= sent:
                    continue
                yield message.data
        finally:
            if self._broadcast.remove(subscriber):
                self._on_disconnect(session.key)

    async def _drain(self, subscriber: Subscriber) -> AsyncIterator[Outgoing]:
        while True:
            message = await subscriber.queue.get()
            if isinstance(message, End):
                if message.overflow:
                    raise Refused("RESOURCE_EXHAUSTED", f"{message.reason}; resubscribe from the next index you need")
                return
            yield message

    def _greet(self, key: bytes) -> None:
        """A fresh stream learns the open iteration (unless it opened while the stream caught up)."""
        current = self._round
        if current is not None and not current.closing and not self._broadcast.announced(key, current.open.iteration):
            self._reconcile(current)
            self._announce_open(current, key)

    def _on_disconnect(self, key: bytes) -> None:
        self.metrics.workers_connected.set(len(self._broadcast.connected()))
        current = self._round
        if current is not None and not current.closing:
            current.release(key)
            self._reconcile(current)
        log.info("worker disconnected", extra={"worker": identity.fingerprint(key)})

    async def read_entries(self, start: int, stop: int) -> AsyncIterator[pb.LedgerEntry]:
        """Stored entries [start, stop) as exact bytes, read in batches off the event loop."""
        index = start
        while index < stop:
            last = min(stop, index + FETCH_BATCH) - 1
            try:
                batch = await asyncio.to_thread(lambda: list(self._store.read(self.spec.job_id, index, last)))
            except StoreError as exc:
                raise Refused("UNAVAILABLE", str(exc)) from None
            if not batch:
                return
            for offset, stored in enumerate(batch):
                yield pb.LedgerEntry(index=index + offset, stored=stored)
            index += len(batch)

    # ---- submissions ----------------------------------------------------------------------

    def _context(self, session: Session) -> validation.Context:
        current = self._round
        closing = current if current is not None and current.closing else None
        return validation.Context(
            job_id=self.spec.job_id,
            worker_key=session.key,
            admitted=self.history.admitted,
            revoked=self.history.revoked,
            open_iteration=current.open if current is not None and closing is None else None,
            last_closed=closing.open.iteration if closing else self.history.last_iteration,
            reward_range=self._reward_range,
            # While closing, what the worker sent this iteration is about to be recorded.
            recorded=closing.held(session.key) if closing else self._recorded.get(session.key, {}),
        )

    async def submit(self, request: pb.SubmitRequest) -> pb.SubmitReply:
        session = self._session(request.session, charge=True)
        limits = self.limits
        if len(request.results) > limits.max_results_per_call or len(request.retention) > limits.max_retention_per_call:
            raise Refused(
                "INVALID_ARGUMENT",
                f"at most {limits.max_results_per_call} results and {limits.max_retention_per_call} retention reports per call; split the batch",
            )
        context = self._context(session)
        current = self._round if context.open_iteration is not None else None
        key = session.key
        result_checks, retention_checks, fields, accepted = [], [], {}, []
        for data in request.results:
            if current is None:
                checked = validation.check_result(context, data, (), {}, ())
            else:
                checked = validation.check_result(context, data, current.assigned.get(key, ()), current.held(key), current.settled)
            if checked.reason == pb.ACCEPTED and current is not None and checked.signed is not None:
                current.accept(checked.signed, data)
                fields[result_field(key, checked.signed.record.member)] = data
                accepted.append(checked.signed)
            result_checks.append(checked)
        for data in request.retention:
            held = current.retention.get(key) if current else None
            requested = current is not None and current.retention_worker == key
            checked_report = validation.check_retention(context, data, requested, held[1] if held else None)
            if checked_report.reason == pb.ACCEPTED and current is not None and checked_report.signed is not None:
                current.retention[key] = (checked_report.signed, data)
                fields[retention_field(key)] = data
            retention_checks.append(checked_report)
        if current is not None and fields and self._may_close(current, now_ms()):
            await self._acknowledged_by_close(current)
        elif fields:
            await self._persist(fields, current, accepted, key)
            if current is not None:
                self._after_accept(current)
        self._count(key, [*result_checks, *retention_checks])
        return pb.SubmitReply(
            results=[pb.ItemStatus(reason=c.reason, detail=c.detail) for c in result_checks],
            retention=[pb.ItemStatus(reason=c.reason, detail=c.detail) for c in retention_checks],
        )

    async def _persist(
        self, fields: dict[bytes, bytes], current: Round | None, accepted: list[Signed[WorkerResult]], key: bytes
    ) -> None:
        try:
            await self._journal.write(fields)
        except StoreError as exc:
            if current is not None:
                for signed in accepted:
                    current.withdraw(signed)
                if retention_field(key) in fields:
                    current.retention.pop(key, None)
            raise Refused("UNAVAILABLE", f"the ledger store failed ({exc}); nothing was accepted, retry later") from None

    async def _acknowledged_by_close(self, current: Round) -> None:
        """This submission completes the iteration: its entry records what the submission brought, so
        acknowledge once the entry is appended, with no journal write of its own (one fsync less on
        every iteration's critical path). Nothing is acknowledged that a restart could lose."""
        if current.appended is None:
            current.appended = asyncio.get_running_loop().create_future()
        current.settled_ms = current.settled_ms or now_ms()
        self._wake.set()
        try:
            await asyncio.shield(current.appended)
        except Exception as exc:  # the close failed: this coordinator stops; its successor resumes
            raise Refused("UNAVAILABLE", f"closing the iteration failed ({exc}); nothing was acknowledged, retry later") from None

    def _count(self, key: bytes, checks: Sequence[Checked[Any]]) -> None:
        accepted = sum(1 for c in checks if c.reason == pb.ACCEPTED)
        rejected = [reason_name(c.reason) for c in checks if not c.held and c.reason != pb.SETTLED]
        stats = self._workers.get(key)
        if stats is not None:
            stats.count(now_ms(), accepted, rejected)
        self.metrics.results_accepted.inc(accepted)
        for reason in rejected:
            self.metrics.rejects.labels(reason=reason).inc()

    def _after_accept(self, current: Round) -> None:
        now = now_ms()
        if self._may_close(current, now):
            current.settled_ms = current.settled_ms or now
            self._wake.set()
        elif current.wanting:
            self._reconcile(current)  # members wait for a holder (or another opinion): this worker may take them

    async def attest(self, request: pb.AttestRequest) -> pb.AttestReply:
        session = self._session(request.session, charge=True)
        held = self.history.attested.get(session.key, {})
        checked = validation.check_attestation(self._context(session), request.attestation, held)
        if checked.reason == pb.ACCEPTED and checked.signed is not None:
            try:
                self._record(checked.signed)
            except StoreError as exc:
                raise Refused("UNAVAILABLE", f"the ledger store failed ({exc}); retry later") from None
        self._count(session.key, [checked])
        return pb.AttestReply(status=pb.ItemStatus(reason=checked.reason, detail=checked.detail))

    # ---- status ---------------------------------------------------------------------------

    def status(self) -> pb.JobStatus:
        now = now_ms()
        history = self.history
        current = self._round
        connected = set(self._broadcast.connected())
        if self.finished.is_set():
            state = pb.JobStatus.FINISHED
        elif self._paused and current is None:
            state = pb.JobStatus.PAUSED
        else:
            state = pb.JobStatus.RUNNING if connected else pb.JobStatus.WAITING
        rejects: Counter[str] = Counter()
        workers = []
        for key, stats in sorted(self._workers.items()):
            rejects.update(stats.rejects)
            workers.append(
                worker_message(identity.fingerprint(key), stats, key in connected, history.strikes[key], key in history.revoked, now)
            )
        recent = list(history.figures)
        return pb.JobStatus(
            job_id=self.spec.job_id,
            state=state,
            iteration=current.open.iteration if current else history.last_iteration,
            iterations_total=self.spec.iterations,
            closed=history.last_iteration,
            population=self.spec.population,
            settled=len(current.settled) if current else 0,
            results_open=current.result_count() if current else 0,
            head_index=history.head.entry.index,
            head_hash=history.head.hash,
            recent=[summary_message(f) for f in recent],
            workers=workers,
            rejects=dict(rejects),
            alerts=alerts_of(recent),
        )
