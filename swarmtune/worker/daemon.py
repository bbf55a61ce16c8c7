"""The worker daemon: catch up, join, follow announcements, evaluate, submit, attest; until the job ends."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, AsyncIterator, Callable, Coroutine, Sequence, TypeAlias, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import batches, entries, identity, ledger
from swarmtune.backends.base import BackendFactory
from swarmtune.entries import Attestation, Iteration, Revocation, StoredEntry
from swarmtune.fixedpoint import FixedPointOverflow
from swarmtune.jobspec import JobSpecError
from swarmtune.models import ModelResolutionError
from swarmtune.replay import ReplayError
from swarmtune.tasks.base import TaskLoadError
from swarmtune.wire import service_pb2 as pb
from swarmtune.worker.backoff import Backoff
from swarmtune.worker.catchup import catch_up
from swarmtune.worker.config import WorkerConfig
from swarmtune.worker.logs import EventLog
from swarmtune.worker.measure import center_retention, evaluation_batch, member_rewards, sign_retention
from swarmtune.worker.outbox import Outbox
from swarmtune.worker.session import Connection, Joined, SessionLost, describe, open_channel, unfold
from swarmtune.worker.site import LoadedModel, Site, load_base_model, open_site
from swarmtune.worker.work import IterationWork, opened_from
from swarmtune.eventwait import set_within

T = TypeVar("T")

# Join refusals no retry can fix: a revoked or unknown key, another job.
REFUSALS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION})

# Leaving (SIGTERM or the job's end): the member in progress may finish first, then the state hash in
# progress (the final attestation: local work, not bounded), then the outbox drains (PROTOCOL §6.3 step 6).
DRAIN_MEMBER_TIMEOUT_S = 30.0
# A connection's helper tasks end this soon after they are cancelled (they only await cancellable things).
HELPERS_EXIT_S = 5.0


class Disconnected(Exception):
    """The stream to the coordinator ended, or we fell out of step with it: reconnect and resume."""


class WorkerFailure(Exception):
    """The worker cannot go on (wrong model, a ledger that does not verify, another job); says what to do."""


@dataclass(frozen=True)
class Stop:
    """SIGTERM/SIGINT arrived: finish the current member, submit, leave."""


@dataclass(frozen=True)
class Crashed:
    """A helper task of the connection failed; the main loop re-raises its error."""

    error: BaseException


Event: TypeAlias = "pb.Announcement | Stop | Crashed | Disconnected"


class Daemon:
    """One worker process: its key, its copy of the job, and the open iteration it works on."""

    def __init__(self, config: WorkerConfig, key: Ed25519PrivateKey, make_backend: BackendFactory, log: EventLog) -> None:
        # Who we are and how we run.
        self.config = config
        self.key = key
        self.public_key = identity.public_key_bytes(key)
        self.operator = config.operator or identity.fingerprint(self.public_key)
        self.make_backend = make_backend
        self.log = log
        # Reconnecting: jittered backoff after consecutive failures.
        self.rng = random.Random()
        self.backoff = Backoff()
        self.failures = 0
        # Threads. One owns the model and the replica: applying and evaluating never overlap.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmtune-compute")
        # Hashing the state for an attestation reads the replica beside evaluation, never beside an apply.
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmtune-attest")
        # Other workers' result signatures in an entry are checked on every core (a big population's
        # entry holds thousands); Ed25519 verification releases the GIL.
        self.verifier = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="swarmtune-verify")
        # The job as we hold it: the base model until genesis, then the site; the open iteration's work.
        self.loaded: LoadedModel | None = None
        self.site: Site | None = None
        self.work: IterationWork | None = None
        # Tasks and the events between them.
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()  # new members to evaluate
        self.evaluator: asyncio.Task[None] | None = None
        self.attesting: asyncio.Task[None] | None = None
        self.fatal: BaseException | None = None  # an evaluation error: stops the worker
        # What we owe the coordinator.
        self.outbox = Outbox(lambda: self.work, self.stop, log, self.backoff, self.rng)

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- lifetime ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until the job finishes (exit 0) or SIGTERM (exit 0); reconnect after any disconnect."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        self.evaluator = asyncio.create_task(self.evaluate_forever())
        try:
            if self.config.model:
                # Loading takes a while: do it before the job needs it, not while an iteration waits.
                self.loaded = await self.compute(load_base_model, self.config.model, self.config.device)
            self.log("ready", model=self.config.model or "from the job spec", device=self.config.device)
            while not self.stop.is_set():
                if await self.connect_once():
                    break
                delay = self.backoff.delay(self.failures, self.rng)
                self.failures += 1
                self.log("reconnecting", in_s=round(delay, 3), attempt=self.failures)
                await self.pause(delay)
        finally:
            self.evaluator.cancel()
            await asyncio.gather(self.evaluator, return_exceptions=True)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.hasher.shutdown(wait=False, cancel_futures=True)
            self.verifier.shutdown(wait=False, cancel_futures=True)
        if self.fatal is not None:
            raise WorkerFailure(f"evaluation failed ({describe(self.fatal)}); fix the task or backend and restart the worker")
        return 0

    async def pause(self, seconds: float) -> None:
        await set_within(self.stop, seconds)

    async def connect_once(self) -> bool:
        """One connection's life; True once there is nothing left to do (job finished or stopped)."""
        connection = Connection(open_channel(self.config.coordinator, self.config.tls_ca))
        try:
            await self.catch_up(connection)
            if self.stop.is_set():
                return True
            joined = await self.join(connection)
            site = self.require_site()
            if joined.genesis_hash != site.job.genesis_hash:
                raise WorkerFailure(
                    f"the coordinator at {self.config.coordinator} now serves another job (genesis "
                    f"{joined.genesis_hash.hex()[:16]}, ours {site.job.genesis_hash.hex()[:16]}); start a new worker for it"
                )
            self.failures = 0
            self.log("joined", job=joined.job_id, worker=identity.fingerprint(self.public_key), head_index=joined.head_index)
            return await self.follow(connection, joined)
        except (grpc.aio.AioRpcError, SessionLost, Disconnected) as exc:
            self.log("disconnected", reason=describe(exc))
            return False
        except (ledger.LedgerError, entries.EntryError) as exc:
            raise WorkerFailure(
                f"the coordinator sent a ledger entry that does not verify ({exc}); this worker stops rather than "
                "apply it: tell the coordinator's operator"
            ) from None
        except (ReplayError, FixedPointOverflow, ModelResolutionError, TaskLoadError, JobSpecError) as exc:
            raise WorkerFailure(str(exc)) from None
        finally:
            await connection.close()

    async def join(self, connection: Connection) -> Joined:
        try:
            return await connection.join(self.key, self.config.capacity, self.operator)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSALS:
                raise WorkerFailure(f"the coordinator refuses this worker ({describe(exc)})") from None
            raise

    def note(self, entry: StoredEntry) -> None:
        """Account for an applied entry: a closed iteration ends its work; our own revocation ends us."""
        body = entry.entry.body
        if isinstance(body, Revocation) and body.worker_key == self.public_key:
            raise WorkerFailure(
                f"this worker's key {identity.fingerprint(self.public_key)} was revoked in entry {entry.entry.index}: "
                f"{body.reason}; check the machine and its backend before joining with a new key"
            )
        if isinstance(body, Iteration):
            self.closed(body.iteration)

    def closed(self, iteration: int) -> None:
        """Iteration `iteration` closed: its work (and any before it) ends."""
        if self.work is not None and self.work.iteration <= iteration:
            left = len(self.work.pending())
            if left:
                self.log("released", iteration=self.work.iteration, members=left)
            self.work = None

    def require_site(self) -> Site:
        if self.site is None:
            raise Disconnected("the coordinator's ledger has no genesis yet")
        return self.site

    # ---- catching up ---------------------------------------------------------------------------

    async def catch_up(self, connection: Connection) -> None:
        """Fetch, verify and apply every entry we do not hold yet (from genesis on the first connect)."""
        await self.wait_attested()
        next_index = self.site.next_index if self.site else 0
        try:
            fetched = connection.fetch(next_index)
            open_genesis = self.open_genesis
            if self.site is None and self.config.snapshot is not None:
                # The snapshot names a checkpoint entry: the ledger so far holds it, read before the site opens.
                prefetched = [item async for item in fetched]
                fetched = _replayed(prefetched)
                open_genesis = partial(self.open_genesis, ledger_so_far=[item.stored for item in prefetched])
            caught = await catch_up(fetched, self.site, self.compute, open_genesis, self.note, self.stop.is_set)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                raise WorkerFailure(
                    f"the coordinator's ledger ends before entry {next_index}, which this worker holds: it lost "
                    "entries (restored from an old copy?); audit the ledger before anyone goes on"
                ) from None
            raise
        if caught is None:
            return
        self.site = caught.site
        self.log(
            "caught_up",
            iteration=caught.site.replica.iteration,
            next_index=caught.site.next_index,
            iterations_applied=caught.iterations_applied,
            seconds=round(caught.seconds, 3),
        )

    def open_genesis(self, stored: bytes, ledger_so_far: Sequence[bytes] = ()) -> Site:
        """The site of the job whose genesis this is (on the compute thread: it loads the model)."""
        site = open_site(stored, self.config, self.make_backend, self.loaded, self.verifier, ledger_so_far)
        self.loaded = None  # the site owns the model now
        if site.snapshot_refused is not None:
            self.log("snapshot_refused", source=self.config.snapshot, error=site.snapshot_refused, fallback="replaying from genesis")
        elif self.config.snapshot is not None:
            self.log("snapshot_loaded", source=self.config.snapshot, iteration=site.replica.iteration)
        self.log("genesis", job=site.job.spec.job_id, iteration=site.replica.iteration, state_hash=site.replica.state_hash().hex())
        return site

    # ---- following the coordinator -------------------------------------------------------------

    async def follow(self, connection: Connection, joined: Joined) -> bool:
        """Handle announcements in order until the job finishes (True) or SIGTERM (True)."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        call = connection.subscribe(joined, self.require_site().next_index)
        helpers = [
            asyncio.create_task(self.pump(call, events)),
            asyncio.create_task(self.relay_stop(events)),
            asyncio.create_task(self.guard(self.outbox.send_forever(connection, joined), events)),
        ]
        try:
            while True:
                event = await events.get()
                if isinstance(event, Stop):
                    self.log("stopping", reason="signal")
                    await self.drain(connection, joined)
                    return True
                if isinstance(event, (Crashed, Disconnected)):
                    raise event.error if isinstance(event, Crashed) else event
                if await self.dispatch(event):
                    await self.drain(connection, joined)
                    return True
        finally:
            call.cancel()
            for helper in helpers:
                helper.cancel()
            # Bounded: a helper that swallowed its cancel must not keep the disconnect unnoticed.
            _, stuck = await asyncio.wait(helpers, timeout=HELPERS_EXIT_S)
            if stuck:
                self.log("helpers_stuck", helpers=sorted(str(task.get_coro()) for task in stuck))

    async def pump(self, call: grpc.aio.UnaryStreamCall, events: asyncio.Queue[Event]) -> None:
        try:
            async for message in call:
                for announcement in unfold(message):
                    events.put_nowait(announcement)
            events.put_nowait(Disconnected("the coordinator ended the announcement stream"))
        except grpc.aio.AioRpcError as exc:
            events.put_nowait(Disconnected(describe(exc)))

    async def relay_stop(self, events: asyncio.Queue[Event]) -> None:
        await self.stop.wait()
        events.put_nowait(Stop())

    async def guard(self, task: Coroutine[Any, Any, None], events: asyncio.Queue[Event]) -> None:
        try:
            await task
        except Exception as exc:  # any failure ends this connection; the main loop decides what it means
            events.put_nowait(Crashed(exc))

    async def dispatch(self, announcement: pb.Announcement) -> bool:
        """Act on one announcement; True when the job has finished."""
        kind = announcement.WhichOneof("kind")
        if kind == "entry":
            await self.on_entry(announcement.entry)
        elif kind == "compact":
            await self.on_compact(announcement.compact)
        elif kind == "opened":
            self.on_opened(announcement.opened)
        elif kind == "reassigned":
            self.on_reassigned(announcement.reassigned)
        elif kind == "finished":
            finished = announcement.finished
            self.log("finished", last_iteration=finished.last_iteration, reason=finished.reason)
            return True
        return False

    async def on_entry(self, item: pb.LedgerEntry) -> None:
        """Verify the entry against our chain head and apply it exactly; attest when the job asks."""
        site = self.require_site()
        if entries.read_header(item.stored).kind != "iteration":
            # Chain bookkeeping only (every worker's attestations, admissions, revocations): verified
            # here rather than queued on the compute thread between two evaluations.
            self.note(site.accept(item.stored))
            return
        await self.wait_attested()
        started = time.perf_counter()
        vouched = self.work.own_signatures() if self.work is not None else frozenset()
        entry = await self.compute(site.advance, item.stored, vouched)
        self.note(entry)
        body = entry.entry.body
        if not isinstance(body, Iteration):
            return
        self.applied(site, body.iteration, entry.entry.index, started)

    async def on_compact(self, item: pb.Compact) -> None:
        """An iteration entry by its coordinator-signed digest: verify its place in our chain, apply its update."""
        site = self.require_site()
        await self.wait_attested()
        started = time.perf_counter()
        digest = await self.compute(site.advance_digest, item.digest)
        self.closed(digest.iteration)
        self.applied(site, digest.iteration, digest.index, started)

    def applied(self, site: Site, iteration: int, index: int, started: float) -> None:
        self.log("applied", iteration=iteration, index=index, seconds=round(time.perf_counter() - started, 4))
        if site.job.spec.attestation_due(iteration):
            # Off the critical path: the next iteration's members start while the state is hashed.
            self.attesting = asyncio.create_task(self.attest(site, iteration))

    async def attest(self, site: Site, iteration: int) -> None:
        state_hash = await asyncio.get_running_loop().run_in_executor(self.hasher, site.replica.state_hash)
        record = Attestation(site.job.spec.job_id, iteration, state_hash, self.public_key)
        self.log("attesting", iteration=iteration, state_hash=state_hash.hex())
        self.outbox.attest(entries.sign_record(self.key, record))

    async def wait_attested(self) -> None:
        """Wait for the state hash in progress: the replica must not move under it."""
        if self.attesting is not None:
            attesting, self.attesting = self.attesting, None
            await attesting

    def on_opened(self, message: pb.IterationOpened) -> None:
        site = self.require_site()
        opened = opened_from(message)
        if opened.iteration != site.chain.last_iteration + 1 or opened.head_hash not in site.chain.open_heads:
            raise Disconnected(
                f"iteration {opened.iteration} was opened on a ledger head we do not hold (we are at iteration "
                f"{site.chain.last_iteration}, entry {site.next_index - 1}); resynchronising"
            )
        if opened.measure_retention and site.job.retention is None:
            self.log("retention_skipped", iteration=opened.iteration, reason="the job names no retention task")
            opened = replace(opened, measure_retention=False)
        if self.work is None or self.work.iteration != opened.iteration:
            signer = partial(batches.sign_batch, self.key, site.job.spec.job_id, opened.iteration, opened.head_hash)
            self.work = IterationWork(opened, signer)
        self.work.assign(message.assigned)
        self.log("opened", iteration=opened.iteration, assigned=len(self.work.assigned), retention=opened.measure_retention)
        self.wake.set()
        self.outbox.notify()

    def on_reassigned(self, message: pb.Reassignment) -> None:
        if self.work is None or self.work.iteration != message.iteration:
            return
        self.work.add(message.added)
        self.log("reassigned", iteration=message.iteration, added=len(message.added))
        self.wake.set()
        self.outbox.notify()

    # ---- evaluating ----------------------------------------------------------------------------

    async def evaluate_forever(self) -> None:
        """Evaluate the open iteration's members as they are assigned; survives reconnects."""
        while not self.stop.is_set():
            work = self.work
            if work is None or not (work.retention_due() or work.pending()):
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                await self.evaluate_step(work)
            except Exception as exc:  # a reward function or backend error: no result can be signed
                self.fatal = exc
                self.stop.set()
                raise

    async def evaluate_step(self, work: IterationWork) -> None:
        site = self.require_site()
        spec = site.job.spec
        started = time.perf_counter()
        if work.retention_due():
            figures = await self.compute(center_retention, site, work.iteration)
            if figures is None:
                self.drop_stale(work)
                return
            work.record_retention(sign_retention(self.key, spec, work.iteration, work.opened.head_hash, figures))
            self.log("retention", iteration=work.iteration, figures=dict(figures), seconds=round(time.perf_counter() - started, 4))
        else:
            members = evaluation_batch(work.pending(), spec.noise_family == "lowrank")
            rewards = await self.compute(member_rewards, site, work.iteration, members)
            if rewards is None:
                self.drop_stale(work)
                return
            work.record({m.member: float(r) for m, r in zip(members, rewards)})
            self.log(
                "evaluated",
                iteration=work.iteration,
                members=[m.member for m in members],
                rewards=rewards,
                seconds=round(time.perf_counter() - started, 4),
            )
        self.outbox.notify()

    def drop_stale(self, work: IterationWork) -> None:
        """The replica moved past `work`'s center (its iteration closed): nothing of it is measurable now."""
        if self.work is work:
            self.work = None

    # ---- leaving -------------------------------------------------------------------------------

    async def drain(self, connection: Connection, joined: Joined) -> None:
        """Before leaving: let the member in progress finish and the state hash in progress end (the
        coordinator waits for the final attestation while we are subscribed), then send what is still unsent (bounded)."""
        self.stop.set()
        self.wake.set()
        if self.evaluator is not None:
            await asyncio.wait({self.evaluator}, timeout=DRAIN_MEMBER_TIMEOUT_S)
        await self.wait_attested()
        await self.outbox.drain(connection, joined)


async def _replayed(items: list[pb.LedgerEntry]) -> AsyncIterator[pb.LedgerEntry]:
    """Entries fetched ahead, handed to catch_up as the stream they came from."""
    for item in items:
        yield item


def serve(config: WorkerConfig, make_backend: BackendFactory) -> int:
    """Run a worker until its job finishes or it is told to stop; the exit status."""
    key = identity.load_private_key(config.key_path)
    return asyncio.run(Daemon(config, key, make_backend, EventLog(config.log_json)).run())
