"""The worker's gRPC connection to its coordinator: channel, join, and calls retried with backoff."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune.grpcoptions import connection_options
from swarmtune.join import join_request
from swarmtune.wire import service_pb2 as pb
from swarmtune.wire import service_pb2_grpc as rpc
from swarmtune.worker.backoff import Backoff

T = TypeVar("T")

# Ledger entries of a large population are big (catching up); batches and attestations are small.
MAX_RECEIVE_BYTES = 64 << 20
MAX_SEND_BYTES = 4 << 20
# A half-open connection (a NAT or proxy that stopped forwarding without closing) is noticed within
# HALF_OPEN_BOUND_S (PROTOCOL §6.1): after KEEPALIVE_TIME_S without a byte from the coordinator we
# ping it; a ping unanswered for KEEPALIVE_TIMEOUT_S closes the connection and fails its calls.
KEEPALIVE_TIME_S = 5
KEEPALIVE_TIMEOUT_S = 10
HALF_OPEN_BOUND_S = KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S
CHANNEL_OPTIONS = (
    # Not a much shorter timeout: on a slow link the ping's answer queues behind the announcement
    # bytes already on their way to us.
    *connection_options(MAX_RECEIVE_BYTES, MAX_SEND_BYTES, KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S),
    # No limit on pings while we send nothing (gRPC's default stops after 2).
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnection is ours (with jitter); the channel's own retry policy would hide failures from us.
    ("grpc.enable_retries", 0),
)
# A unary call on a live connection whose coordinator does not answer (a dead link ends sooner).
CALL_TIMEOUT_S = 30.0
# Transient failures: the call may succeed if made again a little later. CANCELLED comes from the
# coordinator's gRPC shedding calls beyond its backlog (PROTOCOL §6.1), or from its stopping.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


def unfold(message: pb.Announcement) -> Iterator[pb.Announcement]:
    """The announcements one stream message carries, in the order to act on them (PROTOCOL §6.4)."""
    yield message
    while message.HasField("then"):
        message = message.then
        yield message


class SessionLost(Exception):
    """The coordinator no longer knows our session (it restarted, or we were replaced): join again."""


class ConnectError(Exception):
    """The worker cannot set up a channel as configured; the message says what to fix."""


def open_channel(address: str, tls_ca: Path | None) -> grpc.aio.Channel:
    """An outbound channel: TLS verified against `tls_ca` when given, plaintext otherwise."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        roots = Path(tls_ca).read_bytes()
    except OSError as exc:
        raise ConnectError(f"cannot read --tls-ca {tls_ca}: {exc.strerror}; pass the CA certificate (PEM) of the coordinator") from None
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots), options=CHANNEL_OPTIONS)


def describe(exc: BaseException) -> str:
    """An error as one log-friendly line (gRPC errors by status name and details)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def is_retryable(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() in RETRYABLE


@dataclass(frozen=True)
class Joined:
    """An open session: the token sent with every call, and the coordinator's view of the job."""

    token: bytes
    job_id: str
    genesis_hash: bytes
    head_index: int


class Connection:
    """One channel and the calls a worker makes on it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = rpc.CoordinatorStub(channel)

    async def join(self, key: Ed25519PrivateKey, capacity: int, operator: str) -> Joined:
        """Prove possession of `key` by signing a fresh challenge; returns the session."""
        challenge = await self.stub.GetChallenge(pb.ChallengeRequest(), timeout=CALL_TIMEOUT_S)
        request = join_request(key, challenge.job_id, challenge.nonce, capacity, operator)
        reply = await self.stub.Join(request, timeout=CALL_TIMEOUT_S)
        return Joined(reply.session, reply.job_id, reply.genesis_hash, reply.head_index)

    async def fetch(self, from_index: int) -> AsyncIterator[pb.LedgerEntry]:
        """Stored entries from `from_index` up to the head."""
        async for entry in self.stub.FetchLedger(pb.FetchLedgerRequest(from_index=from_index)):
            yield entry

    def subscribe(self, session: Joined, from_index: int) -> grpc.aio.UnaryStreamCall:
        return self.stub.Subscribe(pb.SubscribeRequest(session=session.token, from_index=from_index))

    async def submit(self, session: Joined, batches: list[bytes], retention: list[bytes]) -> pb.SubmitReply:
        request = pb.SubmitRequest(session=session.token, batches=batches, retention=retention)
        return await self.stub.SubmitResults(request, timeout=CALL_TIMEOUT_S)

    async def attest(self, session: Joined, attestation: bytes) -> pb.AttestReply:
        request = pb.AttestRequest(session=session.token, attestation=attestation)
        return await self.stub.Attest(request, timeout=CALL_TIMEOUT_S)

    async def close(self) -> None:
        await self.channel.close()


async def retried(call: Callable[[], Awaitable[T]], backoff: Backoff, rng: random.Random, attempts: int) -> T:
    """`call()`, made again after a jittered backoff while it fails transiently (at most `attempts` times).

    UNAUTHENTICATED means the session is gone: raised as SessionLost so the caller joins again.
    """
    for attempt in range(attempts):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise SessionLost(exc.details() or "session unknown") from None
            if not is_retryable(exc) or attempt + 1 == attempts:
                raise
            await asyncio.sleep(backoff.delay(attempt, rng))
    raise ValueError("attempts must be at least 1")
