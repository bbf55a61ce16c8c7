"""The gRPC servicer: each RPC hands its request to the Job and maps refusals to gRPC statuses."""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from swarmtune.coordinator.job import Job
from swarmtune.coordinator.limits import Refused
from swarmtune.wire import service_pb2 as pb

SERVICE = "swarmtune.v1.Coordinator"

Reply = TypeVar("Reply")


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

    async def Subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Yields serialized Announcements: each is serialized once for all its subscribers."""
        try:
            async for message in self._job.subscribe(request.session, request.from_index):
                yield message
        except Refused as refused:
            await _abort(context, refused)

    async def SubmitResults(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        return await _unary(context, lambda: self._job.submit(request))

    async def Attest(self, request: pb.AttestRequest, context: grpc.aio.ServicerContext) -> pb.AttestReply:
        return await _unary(context, lambda: self._job.attest(request))

    async def FetchLedger(self, request: pb.FetchLedgerRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LedgerEntry]:
        head = self._job.history.head.entry.index
        stop = head + 1 if request.to_index == 0 else request.to_index
        if request.from_index > head + 1 or stop > head + 1 or stop < request.from_index:
            await _abort(
                context,
                Refused("OUT_OF_RANGE", f"range [{request.from_index}, {request.to_index}) is outside the ledger [0, {head + 1}); to_index 0 means the head"),
            )
            return
        try:
            async for entry in self._job.read_entries(request.from_index, stop):
                yield entry
        except Refused as refused:
            await _abort(context, refused)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.JobStatus:
        return self._job.status()


def add_to_server(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """Register the service: like the generated `add_CoordinatorServicer_to_server`, except that
    Subscribe's responses are already bytes, serialized once however many workers receive them."""
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    handlers = {
        "GetChallenge": unary(service.GetChallenge, pb.ChallengeRequest.FromString, pb.Challenge.SerializeToString),
        "Join": unary(service.Join, pb.JoinRequest.FromString, pb.JoinReply.SerializeToString),
        "Subscribe": stream(service.Subscribe, pb.SubscribeRequest.FromString, bytes),
        "SubmitResults": unary(service.SubmitResults, pb.SubmitRequest.FromString, pb.SubmitReply.SerializeToString),
        "Attest": unary(service.Attest, pb.AttestRequest.FromString, pb.AttestReply.SerializeToString),
        "FetchLedger": stream(service.FetchLedger, pb.FetchLedgerRequest.FromString, pb.LedgerEntry.SerializeToString),
        "Status": unary(service.Status, pb.StatusRequest.FromString, pb.JobStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
