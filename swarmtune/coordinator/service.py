"""The gRPC servicer: each RPC hands its request to the Job and maps refusals to gRPC statuses."""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from swarmtune.coordinator.job import Job
from swarmtune.coordinator.limits import Refused
from swarmtune.wire import service_pb2 as pb

SERVICE = "swarmtune.v1.Coordinator"

Reply = TypeVar("Reply")
Request = TypeVar("Request", bound=Message)


async def _abort(context: grpc.aio.ServicerContext, refused: Refused) -> None:
    await context.abort(grpc.StatusCode[refused.code], f"{refused.code}: {refused}")


async def _unary(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Reply]]) -> Reply:
    try:
        return await call()
    except Refused as refused:
        await _abort(context, refused)
        raise  # abort raises; this line only satisfies the type checker


class CoordinatorService:
    def __init__(self, job: Job) -> None:
        self._job = job

    async def GetChallenge(self, request: pb.ChallengeRequest, context: grpc.aio.ServicerContext) -> pb.Challenge:
        return await _unary(context, self._job.challenge)

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        return await _unary(context, lambda: self._job.join(request))

    def Subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Serialized Announcements: each is serialized once for all its subscribers."""
        return self._job.subscribe(request.session, request.from_index)

    async def SubmitResults(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        return await _unary(context, lambda: self._job.submit(request))

    async def Attest(self, request: pb.AttestRequest, context: grpc.aio.ServicerContext) -> pb.AttestReply:
        return await _unary(context, lambda: self._job.attest(request))

    def FetchLedger(self, request: pb.FetchLedgerRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LedgerEntry]:
        head = self._job.history.head.entry.index
        stop = head + 1 if request.to_index == 0 else request.to_index
        if request.from_index > head + 1 or stop > head + 1 or stop < request.from_index:
            what = f"range [{request.from_index}, {request.to_index}) is outside the ledger [0, {head + 1}); to_index 0 means the head"
            raise Refused("OUT_OF_RANGE", what)
        return self._job.read_entries(request.from_index, stop)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.JobStatus:
        return self._job.status()


async def _decode(message: type[Request], raw: bytes, context: grpc.aio.ServicerContext) -> Request:
    """The request parsed from its bytes; bytes that are no such message end the call INVALID_ARGUMENT."""
    try:
        return message.FromString(raw)
    except DecodeError:
        what = f"the request is not a valid {message.DESCRIPTOR.full_name}; build it from proto/service.proto"
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"INVALID_ARGUMENT: {what}")
        raise  # abort raises; this line only satisfies the type checker


def _unary_handler(
    message: type[Request], method: Callable[[Request, grpc.aio.ServicerContext], Awaitable[Message]], reply: type[Message]
) -> grpc.RpcMethodHandler:
    """A unary handler that takes the raw request bytes (gRPC's own parsing failure would be UNKNOWN)."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        return await method(await _decode(message, raw, context), context)

    return grpc.unary_unary_rpc_method_handler(handle, None, reply.SerializeToString)


def _stream_handler(
    message: type[Request], method: Callable[[Request, grpc.aio.ServicerContext], AsyncIterator[Any]], serialize: Callable[[Any], bytes]
) -> grpc.RpcMethodHandler:
    """A server-streaming handler that takes the raw request bytes, like `_unary_handler`, and ends the
    stream with the status of a refusal. The method's own iterator is the only generator in between:
    a live announcement passes through as few layers as possible on its way to every subscriber."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request = await _decode(message, raw, context)
        try:
            async for reply in method(request, context):
                yield reply
        except Refused as refused:
            await _abort(context, refused)

    return grpc.unary_stream_rpc_method_handler(handle, None, serialize)


def add_to_server(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """Register the service: like the generated `add_CoordinatorServicer_to_server`, except that every
    method parses its request itself (undecodable bytes: INVALID_ARGUMENT with a short message, not
    UNKNOWN with protobuf's DecodeError text) and Subscribe's responses are already bytes, serialized
    once however many workers receive them."""
    handlers = {
        "GetChallenge": _unary_handler(pb.ChallengeRequest, service.GetChallenge, pb.Challenge),
        "Join": _unary_handler(pb.JoinRequest, service.Join, pb.JoinReply),
        "Subscribe": _stream_handler(pb.SubscribeRequest, service.Subscribe, bytes),
        "SubmitResults": _unary_handler(pb.SubmitRequest, service.SubmitResults, pb.SubmitReply),
        "Attest": _unary_handler(pb.AttestRequest, service.Attest, pb.AttestReply),
        "FetchLedger": _stream_handler(pb.FetchLedgerRequest, service.FetchLedger, pb.LedgerEntry.SerializeToString),
        "Status": _unary_handler(pb.StatusRequest, service.Status, pb.JobStatus),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
