"""PROTOCOL §6.1 on real gRPC: half-open links noticed within the keepalive bounds, floods and junk answered as documented."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import Any, Coroutine

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError

from swarmtune import identity
from swarmtune.coordinator import server
from swarmtune.coordinator.limits import Limits
from swarmtune.store import LedgerStore, connect
from swarmtune.wire import service_pb2 as pb
from swarmtune.wire.service_pb2_grpc import CoordinatorStub
from swarmtune.worker import session
from tests.support.coordinator_harness import WAIT_S, SimWorker, channel, in_process, spec_text, until, with_workers
from tests.support.tcp_proxy import TcpProxy

# Beyond a bound: the event loop seeing the closed connection on a shared machine.
SLACK_S = 2.0
BURST = 3000
METHODS = pb.DESCRIPTOR.services_by_name["Coordinator"].methods


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


def run(scenario: Coroutine[Any, Any, None], timeout_s: float) -> None:
    asyncio.run(asyncio.wait_for(scenario, timeout_s))


def test_a_half_open_idle_link_is_noticed_by_both_ends_within_their_bounds(store: LedgerStore, job_id: str) -> None:
    """The worker's subscription carries nothing (the job waits for a second worker) when the link stalls:
    the worker's pings find it dead within its bound, the coordinator's within its own."""

    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id), 2, min_workers=2, auto=False) as (c, (admitted, _)):
            proxy = TcpProxy(c.running.port)
            worker_channel = session.open_channel(f"127.0.0.1:{proxy.port}", None)
            worker = SimWorker(CoordinatorStub(worker_channel), job_id, key=admitted.key, auto=False)
            try:
                await worker.join()
                stream = worker.stub.Subscribe(pb.SubscribeRequest(session=worker.session))
                assert (await asyncio.wait_for(stream.read(), WAIT_S)).WhichOneof("kind") == "entry"  # genesis
                await c.until_connected(1)
                # Past gRPC's bandwidth probe of the subscription's first bytes (its unanswered ping would
                # end the connection sooner): the keepalive alone must notice, at its worst case.
                await asyncio.sleep(1.0)
                stalled_at = time.monotonic()
                assert proxy.stall() == 1
                with pytest.raises(grpc.aio.AioRpcError) as info:  # nothing more is coming: only pings can tell
                    await asyncio.wait_for(stream.read(), session.HALF_OPEN_BOUND_S + SLACK_S)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
                assert time.monotonic() - stalled_at <= session.HALF_OPEN_BOUND_S + SLACK_S
                await until(
                    lambda: c.connected() == 0,
                    lambda: f"the coordinator still counts {c.connected()} connected after {time.monotonic() - stalled_at:.1f} s",
                    timeout_s=server.HALF_OPEN_BOUND_S + SLACK_S - (time.monotonic() - stalled_at),
                )
            finally:
                await worker_channel.close()
                proxy.close()

    run(scenario(), server.HALF_OPEN_BOUND_S + 30)


def test_a_burst_over_the_limits_gets_resource_exhausted_not_cancelled(store: LedgerStore, job_id: str) -> None:
    """3,000 concurrent GetChallenge calls and 3,000 SubmitResults of one worker: each is answered or
    refused by the rate limit; none is shed by gRPC's queue of calls waiting for the event loop."""
    limits = Limits(joins_per_s=100, join_burst=1000, calls_per_s=100, call_burst=200)

    async def outcome(call: grpc.aio.UnaryUnaryCall) -> str:
        try:
            await call
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    async def scenario() -> None:
        key = identity.generate_key()
        async with in_process(store, spec_text(job_id), (identity.public_key_bytes(key),), limits=limits) as c:
            worker = SimWorker(c.stub, job_id, key=key, auto=False)
            await worker.join()
            challenges = [outcome(c.stub.GetChallenge(pb.ChallengeRequest())) for _ in range(BURST)]
            submissions = [outcome(c.stub.SubmitResults(pb.SubmitRequest(session=worker.session))) for _ in range(BURST)]
            refusals = {"joins per second; retry with backoff": challenges, "rate limit: at most 100 calls/s per worker": submissions}
            for refusal, calls in refusals.items():
                outcomes = await asyncio.gather(*calls)
                counts = collections.Counter(o if o == "OK" else o.split(":", 1)[0] for o in outcomes)
                assert set(counts) == {"OK", "RESOURCE_EXHAUSTED"}, counts
                assert all(refusal in o for o in outcomes if o != "OK"), collections.Counter(outcomes)

    run(scenario(), 120)


def test_undecodable_requests_get_invalid_argument_on_every_method(store: LedgerStore, job_id: str) -> None:
    """Bytes that are no message of the method's request type: INVALID_ARGUMENT naming the type, never
    UNKNOWN with protobuf's error text. Random bytes that do parse meet the method's usual rules."""
    rng = random.Random(14)
    junk = [b"\xff" * 16, b"\x0a\xff\x01", b"\x08"] + [rng.randbytes(rng.randrange(1, 64)) for _ in range(40)]

    async def code(chan: grpc.aio.Channel, method: MethodDescriptor, request: bytes) -> tuple[grpc.StatusCode, str]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        try:
            if method.server_streaming:
                async for _ in chan.unary_stream(path)(request, timeout=10):
                    pass
            else:
                await chan.unary_unary(path)(request, timeout=10)
            return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""

    def decodes(method: MethodDescriptor, request: bytes) -> bool:
        try:
            getattr(pb, method.input_type.name).FromString(request)
            return True
        except DecodeError:
            return False

    async def scenario() -> None:
        async with in_process(store, spec_text(job_id), open_enrollment=True) as c:
            async with channel(f"127.0.0.1:{c.running.port}") as chan:  # no serializers: requests are raw bytes
                for method in METHODS:
                    for request in junk:
                        status, details = await code(chan, method, request)
                        assert status != grpc.StatusCode.UNKNOWN, (method.name, request, details)
                        if not decodes(method, request):
                            assert status == grpc.StatusCode.INVALID_ARGUMENT, (method.name, request, status, details)
                            assert details == (
                                f"INVALID_ARGUMENT: the request is not a valid {method.input_type.full_name}; build it from proto/service.proto"
                            )

    run(scenario(), 120)
