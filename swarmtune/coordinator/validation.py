"""Checks on what workers submit: each batch member, report or attestation gets exactly one reason code."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Collection, Generic, Mapping, Sequence, TypeVar

from swarmtune import batches, entries, identity
from swarmtune.batches import Batch
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.entries import Attestation, RetentionReport, Signed
from swarmtune.wire import service_pb2 as pb

# Bound on a submitted report or attestation: they carry a few named figures.
MAX_ITEM_BYTES = 4096
MAX_FIGURES = 64
# Bound on a submitted batch: 9 bytes per member at most (a reward and a one-byte gap; longer gaps
# mean fewer members), plus its header.
MAX_BATCH_BYTES = 9 * 65536 + 256

Record = TypeVar("Record", RetentionReport, Attestation)


@dataclass(frozen=True)
class Checked(Generic[Record]):
    """The reason code for one submitted item, a detail that says what to do, and the parsed item."""

    reason: int  # a service_pb2.Reason value
    detail: str
    signed: Signed[Record] | None = None

    @property
    def held(self) -> bool:
        """The coordinator holds the item (newly or before): the worker must not resend it."""
        return self.reason in (pb.ACCEPTED, pb.DUPLICATE)


@dataclass(frozen=True)
class Context:
    """What a submission is checked against: the worker's session, the open iteration, the keys."""

    job_id: str
    worker_key: bytes  # the session's key; every item must be signed by it
    admitted: Collection[bytes]
    revoked: Collection[bytes]
    open_iteration: OpenIteration | None  # None while no iteration takes results
    last_closed: int
    reward_range: tuple[float, float]
    recorded: Mapping[int, float]  # member -> this worker's reward in the last closed iteration's entry


def _reject(reason: int, detail: str) -> Checked[Any]:
    return Checked(reason, detail)


def _parse(record_type: type[Record], data: bytes) -> Signed[Record] | Checked[Any]:
    if len(data) > MAX_ITEM_BYTES:
        return _reject(pb.MALFORMED, f"item is {len(data)} bytes, more than {MAX_ITEM_BYTES}")
    try:
        return entries.decode_signed(record_type, data)
    except entries.EntryError as exc:
        return _reject(pb.MALFORMED, f"{exc}; send the serialized Signed message exactly as signed")


def _opened(record_type: type[Record], context: Context, data: bytes) -> Signed[Record] | Checked[Any]:
    """The parsed item, or why it cannot be taken whatever it says: its bytes, job or signer."""
    parsed = _parse(record_type, data)
    if isinstance(parsed, Checked):
        return parsed
    return _signer_problem(context, parsed.record) or parsed


def _signer_problem(context: Context, record: Any) -> Checked[Any] | None:
    if record.job_id != context.job_id:
        return _reject(pb.WRONG_JOB, f"bound to job {record.job_id!r}; this coordinator runs {context.job_id!r}")
    if record.worker_key != context.worker_key:
        return _reject(pb.KEY_MISMATCH, "signed for another worker key than this session's; sign with the key you joined with")
    if record.worker_key in context.revoked:
        return _reject(pb.REVOKED_KEY, f"worker {identity.fingerprint(record.worker_key)} is revoked in the ledger")
    if record.worker_key not in context.admitted:
        return _reject(pb.UNKNOWN_KEY, f"worker {identity.fingerprint(record.worker_key)} is not admitted; ask the operator to admit it")
    return None


def _iteration_problem(context: Context, iteration: int, head_hash: bytes) -> Checked[Any] | None:
    current = context.open_iteration
    if iteration <= context.last_closed:
        return _reject(pb.ITERATION_CLOSED, f"iteration {iteration} is closed; drop it and follow the announcements")
    if current is None or iteration != current.iteration:
        return _reject(pb.ITERATION_NOT_OPEN, f"iteration {iteration} is not open; wait for its announcement")
    if head_hash != current.head_hash:
        return _reject(pb.WRONG_HEAD, "bound to another ledger head than the open iteration's; use IterationOpened.head_hash")
    return None


def _signature_problem(signed: Signed[Any]) -> Checked[Any] | None:
    if not entries.verify_record(signed):
        return _reject(pb.BAD_SIGNATURE, "signature does not verify over the body bytes with the worker key")
    return None


@dataclass(frozen=True)
class BatchCheck:
    """A submitted batch's answer: the batch's own reason, one check per member (when it was taken
    apart), and the parsed batch."""

    reason: int  # a service_pb2.Reason value
    detail: str
    batch: Batch | None = None
    members: tuple[Checked[Any], ...] = ()  # aligned with batch.members
    fresh: bool = False  # every member ACCEPTED (the common case, answered without a loop per member)

    def status(self) -> pb.BatchStatus:
        if self.fresh:
            # The same message as below, parsed from bytes made once: a field repeated in
            # serialized form is the repeated field.
            return pb.BatchStatus.FromString(_FRESH_STATUS + _ACCEPTED_MEMBER * len(self.members))
        return pb.BatchStatus(
            status=pb.ItemStatus(reason=self.reason, detail=self.detail),
            members=[pb.ItemStatus(reason=c.reason, detail=c.detail) for c in self.members],
        )

    @property
    def accepted(self) -> list[int]:
        """The members newly accepted."""
        if self.batch is None:
            return []
        if self.fresh:
            return list(self.batch.members)
        return [m for m, c in zip(self.batch.members, self.members) if c.reason == pb.ACCEPTED]

    @property
    def checks(self) -> list[Checked[Any]]:
        """One check per member, or the batch's own when it was refused whole (what is counted)."""
        return list(self.members) if self.members else [Checked(self.reason, self.detail)]


def _refused(checked: Checked[Any], batch: Batch | None = None) -> BatchCheck:
    return BatchCheck(checked.reason, checked.detail, batch)


def _all(batch: Batch, reason: int, detail: str) -> BatchCheck:
    return BatchCheck(reason, detail, batch, tuple(Checked(reason, detail) for _ in batch.members))


def check_batch(
    context: Context,
    data: bytes,
    assigned: Collection[int],
    held: Mapping[int, float],
    settled: Collection[int],
    vouched: Mapping[bytes, Batch] = MappingProxyType({}),
) -> BatchCheck:
    """One submitted ResultBatch. `assigned`: members this worker was ever given in the open iteration;
    `held`: its accepted rewards by member; `settled`: members that need no more; `vouched`: submitted
    bytes already decoded and their signature checked (coordinator/verifier.py), not done again."""
    if len(data) > MAX_BATCH_BYTES:
        return _refused(_reject(pb.MALFORMED, f"batch is {len(data)} bytes, more than {MAX_BATCH_BYTES}; send fewer members per batch"))
    checked = vouched.get(data)
    try:
        batch = checked if checked is not None else batches.decode_batch(data)
    except batches.BatchError as exc:
        return _refused(_reject(pb.MALFORMED, f"{exc}; send a serialized ResultBatch exactly as signed"))
    problem = _signer_problem(context, batch)
    if problem:
        return _refused(problem, batch)
    recorded = context.recorded
    if batch.iteration == context.last_closed and all(recorded.get(m) == r for m, r in zip(batch.members, batch.rewards)):
        return _all(batch, pb.DUPLICATE, f"already recorded in iteration {batch.iteration}'s entry")
    problem = _iteration_problem(context, batch.iteration, batch.head_hash)
    if problem:
        return _refused(problem, batch)
    if checked is None and not batches.verify_batch(batch):
        return _refused(_reject(pb.BAD_SIGNATURE, "signature does not verify over the batch payload with the worker key"), batch)
    assert context.open_iteration is not None  # _iteration_problem saw it open
    population = len(context.open_iteration.numbers)
    low, high = context.reward_range
    members, rewards = batch.members, batch.rewards
    if _all_fresh(members, rewards, assigned, held, settled, low, high):  # the common case, without a Python loop per member
        return BatchCheck(pb.ACCEPTED, _TAKEN_APART, batch, (_ACCEPTED,) * len(members), fresh=True)
    checks = tuple(_member_check(m, r, population, assigned, held, settled, low, high) for m, r in zip(members, rewards))
    return BatchCheck(pb.ACCEPTED, _TAKEN_APART, batch, checks)


def _all_fresh(
    members: Sequence[int], rewards: Sequence[float], assigned: Collection[int], held: Mapping[int, float], settled: Collection[int], low: float, high: float
) -> bool:
    """Every member is new from this worker, assigned to it, unsettled, with a finite reward in range:
    each would be ACCEPTED (`_member_check`'s last answer)."""
    return (
        not any(map(held.__contains__, members))
        and all(map(assigned.__contains__, members))
        and not any(map(settled.__contains__, members))
        and all(map(math.isfinite, rewards))
        and (not rewards or (low <= min(rewards) and max(rewards) <= high))
    )


_ACCEPTED: Checked[Any] = Checked(pb.ACCEPTED, "accepted")
_DUPLICATE: Checked[Any] = Checked(pb.DUPLICATE, "already accepted")
_TAKEN_APART = "taken apart: see each member"
# A fresh batch's BatchStatus, serialized: its own status, then one such member status per member.
_FRESH_STATUS = pb.BatchStatus(status=pb.ItemStatus(reason=pb.ACCEPTED, detail=_TAKEN_APART)).SerializeToString()
_ACCEPTED_MEMBER = pb.BatchStatus(members=[pb.ItemStatus(reason=_ACCEPTED.reason, detail=_ACCEPTED.detail)]).SerializeToString()


def _member_check(
    member: int, reward: float, population: int, assigned: Collection[int], held: Mapping[int, float], settled: Collection[int], low: float, high: float
) -> Checked[Any]:
    if member in held:
        if held[member] == reward:
            return _DUPLICATE
        return _reject(pb.CONFLICTING_RESULT, f"a different reward for member {member} was accepted from this worker")
    if member >= population:
        return _reject(pb.NOT_ASSIGNED, f"member {member} is not in the iteration (population {population})")
    if member not in assigned:
        return _reject(pb.NOT_ASSIGNED, f"member {member} is not assigned to this worker")
    if not math.isfinite(reward):
        return _reject(pb.NON_FINITE_REWARD, f"reward {reward} is not finite; report a failed evaluation as the task's lowest reward")
    if not low <= reward <= high:
        return _reject(pb.REWARD_OUT_OF_RANGE, f"reward {reward} is outside the task's range [{low}, {high}]")
    if member in settled:
        return _reject(pb.SETTLED, f"member {member} already has its replicas; no need to send it")
    return _ACCEPTED


def check_retention(context: Context, data: bytes, requested: bool, held: bytes | None) -> Checked[RetentionReport]:
    """One submitted SignedRetention; `requested`: this worker was asked to measure retention."""
    parsed = _opened(RetentionReport, context, data)
    if isinstance(parsed, Checked):
        return parsed
    report = parsed.record
    problem = _iteration_problem(context, report.iteration, report.head_hash)
    if problem:
        return problem
    if held is not None:
        return Checked(pb.DUPLICATE, "already accepted", parsed) if held == data else _reject(
            pb.CONFLICTING_RESULT, "a different retention report was accepted from this worker"
        )
    if not requested:
        return _reject(pb.RETENTION_NOT_REQUESTED, "this worker was not asked to measure retention this iteration")
    if len(report.figures) > MAX_FIGURES:
        return _reject(pb.MALFORMED, f"{len(report.figures)} figures, more than {MAX_FIGURES}")
    bad = next((name for name, value in report.figures if not math.isfinite(value)), None)
    if bad is not None:
        return _reject(pb.NON_FINITE_REWARD, f"figure {bad!r} is not finite")
    return _signature_problem(parsed) or Checked(pb.ACCEPTED, "accepted", parsed)


def check_attestation(context: Context, data: bytes, held: Mapping[int, bytes]) -> Checked[Attestation]:
    """One SignedAttestation of a closed iteration's state; `held`: this worker's recorded ones by iteration."""
    parsed = _opened(Attestation, context, data)
    if isinstance(parsed, Checked):
        return parsed
    attestation = parsed.record
    if attestation.iteration > context.last_closed:
        return _reject(pb.ITERATION_NOT_OPEN, f"iteration {attestation.iteration} is not closed yet; attest after applying it")
    if len(attestation.state_hash) != entries.HASH_BYTES:
        return _reject(pb.MALFORMED, f"state_hash must be {entries.HASH_BYTES} bytes")
    recorded = held.get(attestation.iteration)
    if recorded is not None:
        return Checked(pb.DUPLICATE, "already recorded", parsed) if recorded == data else _reject(
            pb.CONFLICTING_RESULT, f"this worker already attested iteration {attestation.iteration} differently"
        )
    return _signature_problem(parsed) or Checked(pb.ACCEPTED, "accepted", parsed)
