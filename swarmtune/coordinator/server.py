"""Coordinator startup: genesis (once) or recovery, the gRPC server with deliberate limits, shutdown."""

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
from swarmtune.coordinator.admissions import Admissions, by_operator
from swarmtune.coordinator.chain import Chain, History, check_genesis, genesis_entry, recover
from swarmtune.coordinator.job import Job
from swarmtune.coordinator.limits import Limits
from swarmtune.coordinator.metrics import Metrics
from swarmtune.coordinator.service import CoordinatorService, add_to_server
from swarmtune.entries import Genesis
from swarmtune.jobspec import JobSpec
from swarmtune.shaping import SHAPING_VERSION
from swarmtune.store import LedgerStore, redact

log = logging.getLogger("swarmtune.coordinator")

PROTOCOL_VERSION = "swarmtune/1"
# A SubmitRequest of Limits.max_results_per_call signed results (~170 bytes each) fits with room.
MAX_RECEIVE_BYTES = 2 * 1024 * 1024
# Announcements carry whole iteration entries: every signed result of a large population.
MAX_SEND_BYTES = 128 * 1024 * 1024
# One subscription per worker plus its unary calls; beyond this, calls queue instead of piling up.
MAX_CONCURRENT_RPCS = 20_000
SHUTDOWN_GRACE_S = 5.0
FINAL_ATTESTATION_S = 15.0  # workers apply the last entry, then attest it


class ServerError(Exception):
    """The coordinator cannot start; the message says what to do."""


@dataclass(frozen=True)
class ServerOptions:
    listen: str = "127.0.0.1:7070"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # with it, workers must present a certificate it signed (mTLS)
    metrics_port: int | None = None
    serve_after: bool = False
    open_enrollment: bool = False
    admit: tuple[bytes, ...] = ()
    limits: Limits = Limits()
    min_workers: int = 1  # connected workers before the first iteration opens


def grpc_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        # Ping idle connections every 20 s: a worker that vanished behind a NAT is noticed within
        # 30 s and its members re-assigned (straggler re-assignment covers the rest).
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Workers may ping every 10 s; more often is abuse and gets the connection closed.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Never share the port with another process: a second coordinator must fail to bind.
        ("grpc.so_reuseport", 0),
    ]


def genesis_from_model(spec: JobSpec, key: Ed25519PrivateKey, admitted: tuple[bytes, ...]) -> Genesis:
    """Genesis of a new job: the base model's master state hash and tensor plan, the spec bytes, our key."""
    from swarmtune.models import load_model, resolve_model
    from swarmtune.noise import NOISE_VERSION
    from swarmtune.replay import genesis_plan
    from swarmtune.state import build_plan, master_from_model, state_hash

    model, _ = load_model(resolve_model(spec.model))
    state = master_from_model(model, build_plan(model, spec.noise_family, spec.lowrank_others))
    return entries.new_genesis(
        spec.spec_bytes,
        state_hash(state),
        identity.public_key_bytes(key),
        protocol_version=PROTOCOL_VERSION,
        noise_version=NOISE_VERSION,
        shaping_version=SHAPING_VERSION,
        tensor_plan=genesis_plan(state),
        admitted_workers=admitted,
    )


def open_history(
    store: LedgerStore, spec: JobSpec, key: Ed25519PrivateKey, admitted: tuple[bytes, ...], make_genesis: Callable[[], Genesis]
) -> History:
    """Write genesis if the job has no ledger (the only time the model is loaded), then verify the chain."""
    job_id, public = spec.job_id, identity.public_key_bytes(key)
    if store.head(job_id) is None:
        result = store.append(genesis_entry(key, job_id, make_genesis()))
        if not result.ok:
            raise ServerError(f"another coordinator wrote job {job_id!r}'s genesis at the same time; run only one")
        log.info("genesis written", extra={"job": job_id})
    else:
        first = entries.parse_entry(next(iter(store.read(job_id, 0, 0))))
        problem = "its first entry is not a genesis" if not isinstance(first.entry.body, Genesis) else None
        problem = problem or check_genesis(first.entry.body, spec.spec_bytes, public)  # type: ignore[arg-type]
        if problem:
            raise ServerError(f"job {job_id!r} already has a ledger in {redact(store.url)}, but {problem}")
    try:
        return recover(store.read(job_id), public, spec.redundancy_tolerance)
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


def _admit(chain: Chain, keys: tuple[bytes, ...]) -> None:
    """Record the operator's --admit keys (warning about revoked ones: they stay revoked)."""
    for key in dict.fromkeys(keys):
        if key in chain.history.revoked:
            log.warning("not admitting a revoked key", extra={"worker": identity.fingerprint(key)})
    for admission in by_operator(keys, chain.history.admitted, chain.history.revoked):
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
    _admit(chain, options.admit)
    admitted = len(chain.history.admitted - chain.history.revoked)
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
        metrics.serve(options.metrics_port)
    return Running(server, port, job)


async def serve(
    spec: JobSpec, store: LedgerStore, key: Ed25519PrivateKey, history: History, reward_range: tuple[float, float], options: ServerOptions
) -> int:
    """Run the job until its last iteration closes (then keep serving with `serve_after`) or a signal."""
    running = await start(spec, store, key, history, reward_range, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await running.job.start()
        runner = asyncio.create_task(running.job.run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()  # a failed run (e.g. another coordinator appended) ends here with its error
            await running.job.await_final_attestations(FINAL_ATTESTATION_S)
            if options.serve_after and not stop.is_set():
                log.info("job finished; serving the ledger and status until stopped (--serve-after)")
                await stop.wait()
        else:
            log.info("stopping on signal; everything acknowledged is in the ledger store, restart to resume")
            running.job.stop("the coordinator is stopping; reconnect to resume")
        for task in (runner, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await running.server.stop(SHUTDOWN_GRACE_S)
    return 0
