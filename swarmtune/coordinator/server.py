"""Coordinator startup: Redis waited for, the job's lease held, genesis (once) or recovery, the gRPC server
with deliberate limits, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import entries, identity, ledger
from swarmtune.coordinator import heap
from swarmtune.coordinator.admissions import Admissions, as_referees, by_operator
from swarmtune.coordinator.chain import Chain, History, check_genesis, genesis_entry, recover
from swarmtune.coordinator.job import Job
from swarmtune.coordinator.lease import Lease, LeaseTimings, holder_token, kept
from swarmtune.coordinator.limits import Limits
from swarmtune.coordinator.metrics import Metrics
from swarmtune.coordinator.service import CoordinatorService, add_to_server
from swarmtune.coordinator.waiting import RedisWait, wait_for_store
from swarmtune.entries import Genesis
from swarmtune.grpcoptions import GrpcOptions, connection_options
from swarmtune.jobspec import JobSpec
from swarmtune.shaping import SHAPING_VERSION
from swarmtune.store import HeadMismatch, LeaseLost, LedgerStore, redact

log = logging.getLogger("swarmtune.coordinator")

PROTOCOL_VERSION = entries.PROTOCOL_VERSION  # what genesis records; the ledger refuses any other
# A SubmitRequest of result batches (9 bytes a member) for a few thousand members fits with room.
MAX_RECEIVE_BYTES = 2 * 1024 * 1024
# Announcements replayed to a catching-up worker carry whole iteration entries: every batch of a large population.
MAX_SEND_BYTES = 128 * 1024 * 1024
# One subscription per worker plus its unary calls; beyond this, calls queue instead of piling up.
MAX_CONCURRENT_RPCS = 20_000
# Calls that arrived but wait for the event loop to pick them up. gRPC's default sheds new calls at
# random from 1,000 waiting on and all beyond 3,000, as CANCELLED before any handler sees them: a burst
# of 3,000 joins got CANCELLED, not the RESOURCE_EXHAUSTED of the rate limit (PROTOCOL §6.1). As many
# may wait as may run; only beyond that does gRPC itself turn calls away (CANCELLED; workers retry).
MAX_PENDING_CALLS = MAX_CONCURRENT_RPCS
# A worker whose link went half-open (no FIN, no RST: a NAT that lost its mapping) is dropped within
# HALF_OPEN_BOUND_S: after KEEPALIVE_TIME_S without a byte from it we ping it, and a ping unanswered
# for KEEPALIVE_TIMEOUT_S drops it.
KEEPALIVE_TIME_S = 20
KEEPALIVE_TIMEOUT_S = 10
HALF_OPEN_BOUND_S = KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S
# Idle workers ping every 5 s (worker/session.py); more than twice as often is a strike.
MIN_PING_INTERVAL_S = 2
SHUTDOWN_GRACE_S = 5.0
# After the last close the workers of that iteration apply it, hash their state and attest (seconds to
# minutes with the model's size). The coordinator waits while they are subscribed (PROTOCOL §6.3): for
# FINAL_ATTESTATION_GRACE_S in any case (a worker that dropped may reconnect), at most FINAL_ATTESTATION_MAX_S
# (a worker that stays subscribed and never attests; hashing an 8B state takes ~1-2 min on one core).
FINAL_ATTESTATION_GRACE_S = 15.0
FINAL_ATTESTATION_MAX_S = 600.0


class ServerError(Exception):
    """The coordinator cannot start; the message says what to do."""


@dataclass(frozen=True)
class ServerOptions:
    listen: str = "127.0.0.1:7070"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # with it, workers must present a certificate it signed (mTLS)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    serve_after: bool = False
    open_enrollment: bool = False
    admit: tuple[bytes, ...] = ()
    referees: tuple[bytes, ...] = ()  # keys admitted with the referee role (trusted re-evaluators)
    limits: Limits = Limits()
    min_workers: int = 1  # connected workers before the first iteration opens


def grpc_options() -> GrpcOptions:
    # A worker that vanished behind a NAT is noticed within HALF_OPEN_BOUND_S and its members
    # re-assigned (straggler re-assignment covers the rest); workers' pings are welcome on idle
    # connections...
    return connection_options(MAX_RECEIVE_BYTES, MAX_SEND_BYTES, KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S) + [
        # ... at most every MIN_PING_INTERVAL_S; more often is abuse: 2 strikes close the connection.
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_S * 1000),
        ("grpc.http2.max_ping_strikes", 2),
        # Equal soft and hard limits: no call is shed at random below the bound.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        # Never share the port with another process: a second coordinator must fail to bind.
        ("grpc.so_reuseport", 0),
    ]


def genesis_from_model(spec: JobSpec, key: Ed25519PrivateKey, admitted: tuple[bytes, ...]) -> Genesis:
    """Genesis of a new job: the base model's master state hash and tensor plan (streamed from its files,
    never the whole model in memory), the spec bytes, our key."""
    from swarmtune.models import resolve_model
    from swarmtune.noise import NOISE_VERSION
    from swarmtune.statefiles import genesis_base_state

    base = genesis_base_state(resolve_model(spec.model), spec.noise_family, spec.lowrank_others)
    return entries.new_genesis(
        spec.spec_bytes,
        base.state_hash,
        identity.public_key_bytes(key),
        protocol_version=PROTOCOL_VERSION,
        noise_version=NOISE_VERSION,
        shaping_version=SHAPING_VERSION,
        tensor_plan=base.plan,
        admitted_workers=admitted,
    )


def open_history(
    store: LedgerStore, spec: JobSpec, key: Ed25519PrivateKey, admitted: tuple[bytes, ...], make_genesis: Callable[[], Genesis]
) -> History:
    """Write genesis if the job has no ledger (the only time the model's files are read), then verify the chain."""
    try:
        return _verified_history(store, spec, key, make_genesis)
    except HeadMismatch as exc:
        raise ServerError(f"not starting: {exc}") from None


def _verified_history(store: LedgerStore, spec: JobSpec, key: Ed25519PrivateKey, make_genesis: Callable[[], Genesis]) -> History:
    job_id, public = spec.job_id, identity.public_key_bytes(key)
    first = next(store.read(job_id, 0, 0), None)
    if first is None and store.head(job_id) is None:
        result = store.append(genesis_entry(key, job_id, make_genesis()))
        if not result.ok:
            raise ServerError(f"another coordinator wrote job {job_id!r}'s genesis at the same time; run only one")
        log.info("genesis written", extra={"job": job_id})
    elif first is not None:
        problem = check_genesis(first, spec.spec_bytes, public)
        if problem:
            raise ServerError(f"job {job_id!r} already has a ledger in {redact(store.url)}, but {problem}")
    try:
        # To the stream's end, then the head record checked against it: a head that disagrees would
        # let us start and then fail our first append (or append after a hidden entry).
        return recover(store.read_to_end(job_id), public, spec.redundancy_tolerance)
    except ledger.LedgerError as exc:
        raise ServerError(f"the stored ledger of job {job_id!r} does not verify ({exc}); audit it before resuming") from None


def _bind(server: grpc.aio.Server, options: ServerOptions) -> int:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ServerError("pass both --tls-cert and --tls-key, or neither")
    try:
        if options.tls_cert is None or options.tls_key is None:
            return server.add_insecure_port(options.listen)
        client_ca = options.tls_client_ca.read_bytes() if options.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        return server.add_secure_port(options.listen, credentials)
    except OSError as exc:
        raise ServerError(f"cannot read a TLS file: {exc}") from None
    except RuntimeError as exc:
        raise ServerError(f"cannot listen on {options.listen} ({exc}); is another process using the port?") from None


def _admit(chain: Chain, keys: tuple[bytes, ...], referees: tuple[bytes, ...] = ()) -> None:
    """Record the operator's --admit and --referee keys (warning about revoked ones: they stay revoked)."""
    for key in dict.fromkeys((*keys, *referees)):
        if key in chain.history.revoked:
            log.warning("not admitting a revoked key", extra={"worker": identity.fingerprint(key)})
    for admission in by_operator(keys, chain.history.admitted, chain.history.revoked):
        chain.append(admission)
    for admission in as_referees(referees, chain.history.referees, chain.history.revoked):
        chain.append(admission)


@dataclass(frozen=True)
class Running:
    """A started coordinator: its gRPC server, bound port, and job."""

    server: grpc.aio.Server
    port: int
    job: Job


async def start(
    spec: JobSpec, store: LedgerStore, key: Ed25519PrivateKey, history: History, reward_range: tuple[float, float], options: ServerOptions
) -> Running:
    """Admit --admit keys and start serving gRPC; `job.start()` then resumes or opens an iteration."""
    chain = Chain(store, key, history)
    _admit(chain, options.admit, options.referees)
    admitted = len(chain.history.admitted - chain.history.revoked - chain.history.referees)
    if not options.open_enrollment and options.min_workers > admitted:
        raise ServerError(
            f"--min-workers {options.min_workers} can never be met: only {admitted} workers are admitted; "
            "admit more with --admit, use --open-enrollment, or lower --min-workers"
        )
    metrics = Metrics()
    admissions = Admissions(options.open_enrollment)
    job = Job(spec, store, key, chain, reward_range, admissions, options.limits, metrics, options.min_workers)
    server = grpc.aio.server(options=grpc_options(), maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    add_to_server(CoordinatorService(job), server)
    port = _bind(server, options)
    await server.start()
    log.info("listening", extra={"job": spec.job_id, "host": options.listen.rsplit(":", 1)[0], "port": port, "tls": options.tls_cert is not None})
    if options.metrics_port is not None:
        metrics.serve(options.metrics_port, options.metrics_host)
    return Running(server, port, job)


async def serve(
    spec: JobSpec,
    store: LedgerStore,
    key: Ed25519PrivateKey,
    history: History,
    reward_range: tuple[float, float],
    options: ServerOptions,
    stop: asyncio.Event,
    lost: asyncio.Event | None = None,
) -> int:
    """Run the job until its last iteration closes (then keep serving with `serve_after`), `stop` (a
    signal) or `lost` (the job's lease: its ledger is no longer surely this coordinator's to write)."""
    running = await start(spec, store, key, history, reward_range, options)
    lost = lost or asyncio.Event()
    tasks: list[asyncio.Task[object]] = []
    try:
        await running.job.start()
        heap.settle()
        runner = asyncio.create_task(running.job.run())
        tasks = [runner, asyncio.create_task(stop.wait()), asyncio.create_task(lost.wait())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if lost.is_set():
            running.job.stop("this coordinator lost the job's lease; reconnect: the active coordinator serves the job")
        elif runner.done():
            if runner.exception() is not None:  # e.g. another coordinator appended, or a write was fenced
                running.job.stop("the coordinator stopped on an error; reconnect to resume")
            runner.result()  # ... and the run ends here with its error
            waiting = running.job.await_final_attestations(FINAL_ATTESTATION_GRACE_S, FINAL_ATTESTATION_MAX_S)
            final: asyncio.Task[object] = asyncio.create_task(waiting)
            signals = tasks[1:]
            tasks.append(final)  # a signal or a lost lease ends the wait (then every stream ends with the server)
            await asyncio.wait([final, *signals], return_when=asyncio.FIRST_COMPLETED)
            if options.serve_after and not stop.is_set():
                log.info("job finished; serving the ledger and status until stopped (--serve-after)")
                await asyncio.wait(signals, return_when=asyncio.FIRST_COMPLETED)
        else:
            log.info("stopping on signal; everything acknowledged is in the ledger store, restart to resume")
            running.job.stop("the coordinator is stopping; reconnect to resume")
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await running.server.stop(SHUTDOWN_GRACE_S)
    return 0


@dataclass(frozen=True)
class Startup:
    """How a coordinator process reaches its store and claims its job."""

    url: str
    connect: Callable[[], LedgerStore]
    redis_wait: RedisWait = RedisWait()
    lease: LeaseTimings = LeaseTimings()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def main(
    spec: JobSpec,
    key: Ed25519PrivateKey,
    admitted: tuple[bytes, ...],
    reward_range: tuple[float, float],
    options: ServerOptions,
    startup: Startup,
) -> int:
    """A coordinator process: wait for Redis, stand by until it holds the job's lease, then write genesis
    or recover, and serve; every write is fenced by the lease (LeaseLost once it may not be ours)."""
    stop = _stop_on_signals()
    store = await wait_for_store(startup.connect, startup.url, startup.redis_wait, stop)
    if store is None:
        log.info("stopping on signal while waiting for Redis")
        return 0
    with store:
        lease = Lease(store, spec.job_id, holder_token(options.listen), startup.lease)
        if not await lease.acquire(stop):
            log.info("stopping on signal while standing by", extra={"job": spec.job_id})
            return 0
        async with kept(lease):
            fenced = store.fenced(lease.check, lease.token)
            try:
                history = await asyncio.to_thread(open_history, fenced, spec, key, admitted, lambda: genesis_from_model(spec, key, admitted))
                code = 0 if stop.is_set() else await serve(spec, fenced, key, history, reward_range, options, stop, lease.lost)
            except LeaseLost:  # a write refused before the renewal noticed (e.g. after a pause)
                lease.lose("a write was refused: not renewed in time, or Redis names another holder")
            if lease.lost.is_set():
                raise LeaseLost(lease.describe_loss())
            return code
