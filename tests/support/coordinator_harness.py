"""Coordinator test harness: job specs, a model-free genesis, and simulated workers with real keys.

Simulated workers speak the real gRPC protocol and sign real result batches; they evaluate nothing (the
reward is a function of the member), so coordinator tests and the load bench need no model.
"""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import batches, entries, identity
from swarmtune.coordinator.chain import genesis_entry
from swarmtune.coordinator.job import Job
from swarmtune.coordinator.limits import Limits
from swarmtune.coordinator.server import MAX_SEND_BYTES, PROTOCOL_VERSION, Running, ServerOptions, open_history, start
from swarmtune.jobspec import parse_job_spec
from swarmtune.join import join_request
from swarmtune.noise import NOISE_VERSION
from swarmtune.shaping import SHAPING_VERSION
from swarmtune.store import LedgerStore
from swarmtune.wire import service_pb2 as pb
from swarmtune.wire.service_pb2_grpc import CoordinatorStub
from swarmtune.worker.session import unfold
from tests.support.processes import Event, Proc, launch
from tests.support.specs import Table, job_spec

SIM_TASK = f"{Path(__file__).with_name('sim_task.py')}:TASK"
BASE_STATE = bytes(range(32))

# (member, seed) -> reward: what a simulated worker "measures".
RewardFn = Callable[[int, int], float]
WAIT_S = 30.0  # for one step of an in-process job


async def until(condition: Callable[[], bool], what: Callable[[], str], timeout_s: float = WAIT_S) -> None:
    """Return once `condition()` holds (checked every 10 ms); after `timeout_s`, fail saying `what()` was seen."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what()}")
        await asyncio.sleep(0.01)


def spec_text(
    job_id: str,
    *,
    population: int = 6,
    iterations: int = 3,
    deadline: float = 30.0,
    schedule: Table | None = None,
    retention: Table | None = None,
) -> bytes:
    """A job whose members simulated workers "evaluate" (SIM_TASK); `schedule` adds to its [schedule]."""
    return job_spec(
        job_id,
        model="builtin:tiny",
        seed=7,
        iterations=iterations,
        task={"name": SIM_TASK},
        es={"population": population},
        schedule={"deadline_seconds": deadline, "attest_every": 0, **(schedule or {})},
        retention=retention,
    ).encode()


def write_genesis(store: LedgerStore, spec_bytes: bytes, job_id: str, key: Ed25519PrivateKey, admitted: tuple[bytes, ...]) -> None:
    """A genesis without a model (a fixed base state hash): enough for the coordinator, not for replay."""
    genesis = entries.new_genesis(
        spec_bytes,
        BASE_STATE,
        identity.public_key_bytes(key),
        protocol_version=PROTOCOL_VERSION,
        noise_version=NOISE_VERSION,
        shaping_version=SHAPING_VERSION,
        admitted_workers=admitted,
    )
    assert store.append(genesis_entry(key, job_id, genesis)).ok


def reasons(reply: pb.SubmitReply) -> list[int]:
    """Each member's reason, batch after batch (a batch refused whole: its own reason, once)."""
    return [m.reason for b in reply.batches for m in (b.members or [b.status])]


def default_reward(member: int, seed: int) -> float:
    return (seed % 1000) / 1000


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_SEND_BYTES)])


@dataclass
class SimWorker:
    """A worker that answers every assigned member at once with `reward(member, seed)`."""

    stub: CoordinatorStub
    job_id: str
    key: Ed25519PrivateKey = field(default_factory=identity.generate_key)
    capacity: int = 4
    operator: str = ""
    reward: RewardFn = default_reward
    # A reward from the member alone, no noise seed derived per member: a load bench's workers, whose
    # own work must stay small next to the coordinator's on shared cores.
    member_reward: Callable[[int], float] | None = None
    auto: bool = True  # answer assignments as they come
    take_reassignments: bool = True  # with auto, also answer members re-assigned to it
    keep_entries: bool = True  # keep entry announcements (a load test drops them: memory)
    session: bytes = b""
    announcements: list[pb.Announcement] = field(default_factory=list)
    replies: list[pb.SubmitReply] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    opened: dict[int, pb.IterationOpened] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    @property
    def public(self) -> bytes:
        return identity.public_key_bytes(self.key)

    async def join(self) -> pb.JoinReply:
        challenge = await self.stub.GetChallenge(pb.ChallengeRequest())
        reply = await self.stub.Join(join_request(self.key, self.job_id, challenge.nonce, self.capacity, self.operator))
        self.session = reply.session
        return reply

    def batch(self, opened: pb.IterationOpened, members: list[int], rewards: list[float] | None = None, **changes: object) -> bytes:
        """One signed batch of `members` of `opened`; `changes` override the bound fields (job_id,
        iteration, head_hash) to forge bad ones."""
        if rewards is None and self.member_reward is not None:
            rewards = [self.member_reward(m) for m in members]
        elif rewards is None:
            plan = entries.plan_from_pb(opened.plan)
            rewards = [self.reward(m, plan.noise(opened.iteration, m).seed) for m in members]
        bound: dict[str, Any] = dict(job_id=self.job_id, iteration=opened.iteration, head_hash=opened.head_hash)
        bound.update(changes)
        return batches.encode_batch(batches.sign_batch(self.key, bound["job_id"], bound["iteration"], bound["head_hash"], members, rewards))

    def result(self, opened: pb.IterationOpened, member: int, reward: float | None = None, **changes: object) -> bytes:
        """A batch of one member (a test's single result)."""
        return self.batch(opened, [member], None if reward is None else [reward], **changes)

    async def submit(self, batches: list[bytes], retention: list[bytes] | None = None) -> pb.SubmitReply:
        reply = await self.stub.SubmitResults(pb.SubmitRequest(session=self.session, batches=batches, retention=retention or []))
        self.replies.append(reply)
        return reply

    def start(self, from_index: int = 0) -> None:
        self._task = asyncio.create_task(self._follow(from_index))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass

    async def _follow(self, from_index: int) -> None:
        stream = self.stub.Subscribe(pb.SubscribeRequest(session=self.session, from_index=from_index))
        async for carrier in stream:
            for message in unfold(carrier):
                await self._take(message)
        self.closed.set()

    async def _take(self, message: pb.Announcement) -> None:
        kind = message.WhichOneof("kind")
        if kind not in ("entry", "compact") or self.keep_entries:
            self.announcements.append(message)
        if kind == "opened":
            self.opened[message.opened.iteration] = message.opened
            if self.auto:
                await self._answer(message.opened, message.opened.assigned)
        elif kind == "reassigned" and self.auto and self.take_reassignments:
            await self._answer(self.opened[message.reassigned.iteration], message.reassigned.added)

    async def _answer(self, opened: pb.IterationOpened, members: list[int]) -> None:
        if members:
            await self.submit([self.batch(opened, sorted(members))])

    async def until_opened(self, iteration: int) -> pb.IterationOpened:
        """The announcement that opened `iteration`, once it has come."""
        kinds = lambda: [a.WhichOneof("kind") for a in self.announcements]  # noqa: E731
        await until(lambda: iteration in self.opened, lambda: f"iteration {iteration} not opened; heard {kinds()}")
        return self.opened[iteration]

    def entries(self) -> list[pb.LedgerEntry]:
        """Whole entries announced (iteration entries come as digests: see `digests`)."""
        return [a.entry for a in self.announcements if a.WhichOneof("kind") == "entry"]

    def digests(self) -> list[pb.Compact]:
        return [a.compact for a in self.announcements if a.WhichOneof("kind") == "compact"]

    def indices(self) -> list[int]:
        """The ledger index of every entry announced, whole or by digest, in arrival order."""
        return [a.entry.index if a.WhichOneof("kind") == "entry" else a.compact.index for a in self.announcements if a.WhichOneof("kind") in ("entry", "compact")]

    def finished(self) -> bool:
        return any(a.WhichOneof("kind") == "finished" for a in self.announcements)


@dataclass
class InProcess:
    """A coordinator running in this event loop over a real store, and a stub to reach it."""

    running: Running
    stub: CoordinatorStub
    key: Ed25519PrivateKey
    runner: asyncio.Task[None] | None = None

    @property
    def job(self) -> Job:
        return self.running.job

    def connected(self) -> int:
        return sum(w.connected for w in self.job.status().workers)

    async def until_connected(self, count: int) -> None:
        await until(lambda: self.connected() >= count, lambda: f"{self.connected()} of {count} workers connected")

    async def until_closed(self, iteration: int) -> None:
        await until(
            lambda: self.job.history.last_iteration >= iteration,
            lambda: f"iteration {iteration} not closed (last closed: {self.job.history.last_iteration})",
        )

    async def begin(self, *workers: SimWorker) -> None:
        """Join and subscribe `workers`, then open the first iteration (so they share it)."""
        for worker in workers:
            await worker.join()
            worker.start()
        await self.until_connected(len(workers))
        await self.job.start()
        self.runner = asyncio.create_task(self.job.run())


@asynccontextmanager
async def in_process(
    store: LedgerStore,
    spec_bytes: bytes,
    admitted: tuple[bytes, ...] = (),
    open_enrollment: bool = False,
    limits: Limits = Limits(),
    min_workers: int = 1,
) -> AsyncIterator[InProcess]:
    spec = parse_job_spec(spec_bytes)
    key = identity.generate_key()
    write_genesis(store, spec_bytes, spec.job_id, key, admitted)
    history = open_history(store, spec, key, admitted, make_genesis=_no_model)
    options = ServerOptions(listen="127.0.0.1:0", open_enrollment=open_enrollment, limits=limits, min_workers=min_workers)
    running = await start(spec, store, key, history, (0.0, 1.0), options)
    async with channel(f"127.0.0.1:{running.port}") as chan:
        coordinator = InProcess(running, CoordinatorStub(chan), key)
        try:
            yield coordinator
        finally:
            if coordinator.runner is not None:
                coordinator.runner.cancel()
            running.job.stop("test over")
            await running.server.stop(0)


def _no_model() -> entries.Genesis:
    raise AssertionError("the harness writes genesis itself")


class CoordinatorProcess:
    """`swarmtune coordinator` in a subprocess, on a job whose genesis the harness wrote (no model).

    Each start is a new life with its own log next to the job file; `events` are those of every life.
    """

    def __init__(self, job_file: Path, redis_url: str, key_file: Path, admitted: tuple[bytes, ...], *extra: str) -> None:
        self.job_file = job_file
        self.args = [
            "coordinator", "--job", str(job_file), "--redis-url", redis_url, "--key", str(key_file),
            "--listen", "127.0.0.1:0", "--log-json",
            *(["--admit", *(k.hex() for k in admitted)] if admitted else ["--open-enrollment"]),
            *extra,
        ]  # fmt: skip
        self.lives: list[Proc] = []

    @property
    def events(self) -> list[Event]:
        return [event for life in self.lives for event in life.events()]

    def start(self, timeout_s: float = 30.0) -> int:
        """Start the process and return its port once it listens (fails with its log otherwise)."""
        log = self.job_file.with_name(f"{self.job_file.stem}-coordinator-{len(self.lives)}.log")
        self.lives.append(launch(log.stem, "swarmtune", self.args, log))
        return int(self.lives[-1].wait_for("listening", timeout_s)["port"])

    def kill(self) -> None:
        if self.lives:
            self.lives[-1].kill()

    def stop(self, timeout_s: float) -> int:
        """SIGTERM, then its exit status."""
        self.lives[-1].send(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float) -> int:
        return self.lives[-1].wait(timeout_s)


@asynccontextmanager
async def with_workers(
    store: LedgerStore, spec_bytes: bytes, count: int, limits: Limits = Limits(), min_workers: int = 1, **worker_options: Any
) -> AsyncIterator[tuple[InProcess, list[SimWorker]]]:
    """An in-process coordinator and `count` admitted simulated workers (not joined yet)."""
    keys = [identity.generate_key() for _ in range(count)]
    admitted = tuple(identity.public_key_bytes(k) for k in keys)
    async with in_process(store, spec_bytes, admitted, limits=limits, min_workers=min_workers) as c:
        yield c, [SimWorker(c.stub, c.job.spec.job_id, key=k, **worker_options) for k in keys]
