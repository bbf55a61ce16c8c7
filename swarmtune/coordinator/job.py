"""The running job: the open iteration's lifecycle, joins, streams, submissions and closes (no gRPC here)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import identity
from swarmtune.coordinator import lifecycle, validation
from swarmtune.coordinator.admissions import Admissions
from swarmtune.coordinator.broadcast import Broadcaster, End, announce, compact_outgoing, entry_outgoing
from swarmtune.coordinator.chain import Chain, History, now_ms
from swarmtune.coordinator.checkpoints import due_checkpoint
from swarmtune.coordinator.close import Closing, build_iteration, recorded_rewards, retention_alerts, revocations
from swarmtune.coordinator.intake import Intake, take
from swarmtune.coordinator.joining import Gate
from swarmtune.coordinator.journal import Journal
from swarmtune.coordinator.limits import Limits, Refused
from swarmtune.coordinator.metrics import Metrics
from swarmtune.redundancy import revocation_reason
from swarmtune.coordinator.resume import reopen, resume
from swarmtune.coordinator.round import META_FIELD, Round
from swarmtune.coordinator.scheduling import Scheduler
from swarmtune.coordinator.sessions import Session
from swarmtune.coordinator.status import CloseTiming, Observed, WorkerStats, job_status
from swarmtune.coordinator.validation import MAX_BATCH_BYTES, Checked
from swarmtune.coordinator.verifier import Verifier
from swarmtune.digest import digest_of, seal_digest
from swarmtune.entries import Body, Iteration, Revocation, StoredEntry
from swarmtune.jobspec import JobSpec
from swarmtune.store import LedgerStore, StoreError
from swarmtune.wire import service_pb2 as pb
from swarmtune.eventwait import set_within

log = logging.getLogger("swarmtune.coordinator")

FETCH_BATCH = 256
IDLE_TICK_S = 1.0


def _warn_if_unstored(stored: asyncio.Future[None]) -> None:
    if not stored.cancelled() and stored.exception() is not None:
        log.warning("the open iteration's state was not stored; a restart reopens it afresh", extra={"error": str(stored.exception())})


class Job:
    """One job's coordinator state machine; the gRPC servicer is a thin layer over its methods."""

    def __init__(
        self,
        spec: JobSpec,
        store: LedgerStore,
        key: Ed25519PrivateKey,
        chain: Chain,
        reward_range: tuple[float, float],
        admissions: Admissions,
        limits: Limits = Limits(),
        metrics: Metrics | None = None,
        min_workers: int = 1,
    ) -> None:
        self.spec = spec
        self.limits = limits
        self.min_workers = min_workers
        self.metrics = metrics or Metrics()
        # ledger and Redis
        self._store = store
        self._key = key
        self._chain = chain
        self._journal = Journal(store, spec.job_id)
        # joining
        self._admissions = admissions
        self._gate = Gate(spec.job_id, limits)
        # streams and who evaluates what
        self._broadcast = Broadcaster(limits.queue_limit)
        self._scheduler = Scheduler(spec, chain.history, self._gate.sessions, self._broadcast, key, self._post_open)
        # submissions
        self._reward_range = reward_range
        self._verifier = Verifier(MAX_BATCH_BYTES)
        self._round: Round | None = None
        self._recorded: dict[bytes, dict[int, float]] = {}  # worker -> member -> reward in the last iteration entry
        # lifecycle
        self._wake = asyncio.Event()
        self._paused = False
        self._opened_once = False  # --min-workers holds back only the first iteration this process opens
        self._waiting_for_workers = False
        self.finished = asyncio.Event()
        # status
        self._observed = Observed()

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def history(self) -> History:
        return self._chain.history

    async def start(self) -> None:
        """Resume the open iteration Redis holds (every item in it checked again), or open the next one (or finish)."""
        self._checkpoint(range(1, self.history.last_iteration + 1))  # one that was due when the last run stopped
        fields = await asyncio.to_thread(self._store.get_open, self.spec.job_id)
        self._round = resume(self.spec, fields, self.history, self._reward_range, now_ms())
        if self._round is not None:
            reopen(self._scheduler, self._round, fields, self.history)
            self._opened_once = True
            self.metrics.iteration.set(self._round.open.iteration)
            extra = {"iteration": self._round.open.iteration, "results": self._round.result_count(), "retention": len(self._round.retention)}
            log.info("resumed iteration", extra=extra)
            for key in self._broadcast.connected():  # workers that subscribed while we read Redis
                self._scheduler.greet(self._round, key)
            return
        if fields:
            await asyncio.to_thread(self._store.delete_open, self.spec.job_id)
        await self._advance()

    async def run(self) -> None:
        """Drive deadlines, straggler re-assignment and closes until the job is finished."""
        while not self.finished.is_set():
            self._wake.clear()
            await set_within(self._wake, self._next_timer_s())
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
        if current is None and self._waiting_for_workers and len(self._scheduler.candidates()) >= self.min_workers:
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
            self._scheduler.reconcile(current)
        else:
            self._scheduler.reconcile(current)

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
        elif not self._opened_once and len(self._scheduler.candidates()) < self.min_workers:
            if not self._waiting_for_workers:
                log.info("waiting for workers before the first iteration", extra={"iteration": last + 1, "min_workers": self.min_workers})
            self._waiting_for_workers = True
        else:
            self._waiting_for_workers = False
            self._opened_once = True
            await self._open(last + 1)

    async def _open(self, iteration: int) -> None:
        opened = lifecycle.open_iteration(self.spec, iteration, self._chain.head.hash, now_ms())
        # Announced without waiting for Redis: an iteration is a pure function of (job, t, head), so a
        # restart that finds no meta reopens the same one, and every result signed for it still counts.
        self._post_open({META_FIELD: lifecycle.encode_open_meta(opened)})
        self._round = self._scheduler.open_round(opened)
        self.metrics.iteration.set(iteration)

    def _post_open(self, fields: Mapping[bytes, bytes]) -> None:
        self._journal.post(fields).add_done_callback(_warn_if_unstored)

    def _finish(self, reason: str) -> None:
        finished = pb.JobFinished(last_iteration=self.history.last_iteration, head_index=self._chain.head.entry.index, reason=reason)
        self._broadcast.publish(announce(pb.Announcement(finished=finished)))
        # A worker that owes the final attestation keeps its stream: while it is subscribed it is still
        # applying, hashing or sending (its link is watched by keepalive), and await_final_attestations
        # waits for it; it closes the stream itself once it has drained.
        owing = self._owing_final()
        for key in self._broadcast.connected():
            if key not in owing:
                self._broadcast.send(key, End(f"job finished: {reason}"))
        self.finished.set()
        log.info("job finished", extra={"iteration": self.history.last_iteration, "reason": reason})

    def _owing_final(self) -> set[bytes]:
        """Workers whose results the last iteration entry recorded and whose attestation of it is not in yet."""
        last = self.history.last_iteration
        if not self.spec.attestation_due(last):
            return set()
        return {key for key in self._recorded if last not in self.history.attested.get(key, {})}

    async def await_final_attestations(self, grace_s: float, max_s: float) -> None:
        """After the last close, wait for the final attestations (PROTOCOL §6.3): until every worker of the
        last iteration has attested, or — after `grace_s`, in which one that dropped may reconnect — none of
        those missing is still subscribed (they drained and left), or `max_s` passed. The wait thus scales
        with what the workers do (apply the last entry, hash their state: seconds at 0.5B), not with a guess."""
        started = time.monotonic()
        while owing := self._owing_final():
            waited = time.monotonic() - started
            still_draining = owing & set(self._broadcast.connected())
            if waited >= max_s or (waited >= grace_s and not still_draining):
                why = "timed out" if still_draining else "the workers left without attesting"
                who = sorted(identity.fingerprint(key) for key in owing)
                log.warning(
                    "final attestations incomplete",
                    extra={"iteration": self.history.last_iteration, "missing": who, "reason": why, "waited_s": round(waited, 1)},
                )
                break
            await asyncio.sleep(0.1)
        self._broadcast.publish(End("job finished"))

    def stop(self, reason: str) -> None:
        """End every subscription (the process is going away; workers reconnect to its successor)."""
        self._broadcast.publish(End(reason))

    # ---- closing --------------------------------------------------------------------------

    def _record(self, body: Body) -> StoredEntry:
        """Append an entry and announce it, with no await in between (see Chain): an iteration entry by
        its signed digest (PROTOCOL §6.2), any other whole."""
        stored = self._chain.append(body)
        if isinstance(body, Iteration):
            self._broadcast.publish(compact_outgoing(stored.entry.index, seal_digest(self._key, digest_of(stored))))
        else:
            self._broadcast.publish(entry_outgoing(stored.entry.index, stored.stored))
        return stored

    def _build(self, current: Round, raised: tuple[str, ...] = ()) -> Closing:
        revoked = frozenset(self.history.revoked)
        reports = [signed for key, (signed, _) in sorted(current.retention.items()) if key not in revoked]
        alerts, _ = retention_alerts(reports, self.history.baselines, self.spec.retention_alert_threshold)
        return build_iteration(self.spec, current.open, current.accepted(), revoked, reports, (*alerts, *raised), current.panel, current.given)

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
        timing = CloseTiming.measured(closing.body.iteration, current.open.opened_ms, settled_ms, done)
        self._observed.timings.append(timing)
        self._recorded = recorded_rewards(closing.body)
        self._round = None
        figures = self.history.figures[-1]
        self.metrics.observe_close(figures, timing)
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
            log.warning("alert", extra={"iteration": closing.body.iteration, "alerts": list(alerts)})
            self.metrics.alerts.inc(len(alerts))
            self._paused = self.spec.pause_on_alert and any(alert.startswith("retention") for alert in alerts)
        # No yield to the streams in between: each worker's digest and its next opening go as one
        # message (broadcast.carried), one gRPC send per worker and iteration instead of two.
        await self._advance()

    async def _seal(self, current: Round) -> tuple[Closing, StoredEntry]:
        """The iteration entry, appended (after any revocation it brings)."""
        # Built while the last journal writes land (a closing round takes no result), again if one
        # failed (its batch is withdrawn); appended after them, so that no write of the open state
        # follows the append that drops it.
        withdrawn = current.withdrawn
        closing = self._build(current)
        await self._journal.drain()
        if current.withdrawn != withdrawn:
            closing = self._build(current)
        counts = self.history.strikes_with(closing.verdicts.values())
        referees = current.panel.referees
        revoking, raised = revocations(closing, counts, self.spec.revoke_after, referees, frozenset(self.history.revoked), self.history.operators)
        for key in revoking:
            self._revoke(key, counts[key], bool(referees))
        if revoking or raised:  # revoked keys' results stop counting, in this iteration too
            closing = self._build(current, raised)
        return closing, self._record(closing.body)

    def _revoke(self, key: bytes, count: int, refereed: bool) -> None:
        workers = self._observed.workers
        operator = self.history.operators.get(key) or (workers[key].operator if key in workers else "")
        reason = revocation_reason(count, self.spec.revoke_after, refereed)
        self._record(Revocation(key, reason, operator))
        self._broadcast.send(key, End("worker key revoked"))
        self._gate.sessions.close(key)
        self.metrics.revocations.inc()
        log.warning("worker revoked", extra={"worker": identity.fingerprint(key), "reason": reason})

    # ---- joining --------------------------------------------------------------------------

    async def challenge(self) -> pb.Challenge:
        return self._gate.challenge(self.history.genesis_hash)

    async def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        proof = self._gate.proof(request)
        key, who = proof.worker_key, identity.fingerprint(proof.worker_key)
        decision = self._admissions.decide(key, proof.operator_id, self.history.admitted, self.history.revoked)
        if decision.entry is not None:
            self._record(decision.entry)
        session = self._gate.sessions.open(key, decision.operator, proof.capacity, time.monotonic())
        self._broadcast.send(key, End("the worker joined again"))
        self._observed.workers[key] = WorkerStats(decision.operator, proof.capacity, last_seen_ms=now_ms())
        log.info("worker joined", extra={"worker": who, "operator": decision.operator, "capacity": proof.capacity})
        head = self._chain.head
        return pb.JoinReply(
            session=session.token,
            worker_id=who,
            job_id=self.spec.job_id,
            genesis_hash=self.history.genesis_hash,
            head_index=head.entry.index,
            coordinator_key=identity.public_key_bytes(self._key),
        )

    # ---- announcements --------------------------------------------------------------------

    async def subscribe(self, token: bytes, from_index: int) -> AsyncIterator[bytes]:
        """Entries from `from_index` to the head, then live announcements (serialized Announcements)."""
        session = self._gate.session(token, charge=True)
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
            self._scheduler.greet(self._round, session.key)
            if self._waiting_for_workers:
                self._wake.set()
            async for data in subscriber.messages(after=sent):
                yield data
        finally:
            if self._broadcast.remove(subscriber):
                self._on_disconnect(session.key)

    def _on_disconnect(self, key: bytes) -> None:
        self.metrics.workers_connected.set(len(self._broadcast.connected()))
        current = self._round
        if current is not None and not current.closing:
            current.release(key)
            self._scheduler.reconcile(current)
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
            recorded=closing.held_rewards(session.key) if closing else self._recorded.get(session.key, {}),
        )

    async def submit(self, request: pb.SubmitRequest) -> pb.SubmitReply:
        session = self._gate.session(request.session, charge=True)
        self.limits.check_submission(len(request.batches), len(request.retention))
        vouched = await self._verifier.check(request.batches)  # before the context: the round may move meanwhile
        context = self._context(session)
        current = self._round if context.open_iteration is not None else None
        intake = take(context, current, request.batches, request.retention, vouched)
        if current is not None and intake.fields and self._may_close(current, now_ms()):
            await self._acknowledged_by_close(current)
        elif intake.fields:
            await self._persist(intake, current, session.key)
            if current is not None:
                self._after_accept(current)
        self._count(session.key, intake.checks)
        return intake.reply()

    async def _persist(self, intake: Intake, current: Round | None, key: bytes) -> None:
        try:
            await self._journal.write(intake.fields)
        except StoreError as exc:
            if current is not None:
                intake.give_back(current, key)
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
        rejected = [pb.Reason.Name(c.reason) for c in checks if not c.held and c.reason != pb.SETTLED]
        stats = self._observed.workers.get(key)
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
            self._scheduler.reconcile(current)  # members wait for a holder (or another opinion): this worker may take them

    async def attest(self, request: pb.AttestRequest) -> pb.AttestReply:
        session = self._gate.session(request.session, charge=True)
        held = self.history.attested.get(session.key, {})
        checked = validation.check_attestation(self._context(session), request.attestation, held)
        if checked.reason == pb.ACCEPTED and checked.signed is not None:
            try:
                self._record(checked.signed)
                self._checkpoint([checked.signed.record.iteration])
            except StoreError as exc:
                raise Refused("UNAVAILABLE", f"the ledger store failed ({exc}); retry later") from None
        self._count(session.key, [checked])
        return pb.AttestReply(status=pb.ItemStatus(reason=checked.reason, detail=checked.detail))

    def _checkpoint(self, iterations: Iterable[int]) -> None:
        """Append the newest checkpoint the attestations of `iterations` make ready, if any (PROTOCOL §5.9)."""
        history = self.history
        spec = self.spec
        due = due_checkpoint(history.attested, history.admitted, spec.checkpoint_every, spec.checkpoint_quorum, iterations, history.last_checkpoint)
        if due is not None:
            stored = self._record(due)
            extra = {"iteration": due.iteration, "index": stored.entry.index, "state_hash": due.state_hash.hex(), "attestors": len(due.attestations)}
            log.info("checkpoint", extra=extra)

    # ---- status ---------------------------------------------------------------------------

    def status(self) -> pb.JobStatus:
        connected = set(self._broadcast.connected())
        return job_status(
            self.spec, self.history, self._round, self._observed, connected, self.finished.is_set(), self._paused, now_ms()
        )
