"""Batch-signed results: one worker's rewards for many members, packed and signed once (PROTOCOL §5.5)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate, repeat
from typing import Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from swarmtune import identity
from swarmtune.wire import ledger_pb2 as pb

MEMBER_LIMIT = 1 << 32  # members are u32
KEY_BYTES = identity.PUBLIC_KEY_BYTES
HEAD_BYTES = 32
REWARD_BYTES = 8


class BatchError(ValueError):
    """Bytes that are not a well-formed result batch; the message says which part."""


def pack_members(members: Sequence[int]) -> bytes:
    """Strictly increasing member numbers as unsigned LEB128 gaps, the first gap from -1 (so no gap is 0)."""
    out = bytearray()
    previous = -1
    for member in members:
        gap = member - previous
        if gap < 1 or member >= MEMBER_LIMIT:
            raise ValueError(f"members must be strictly increasing u32 values; {member} follows {previous}")
        while gap >= 0x80:
            out.append(gap & 0x7F | 0x80)
            gap >>= 7
        out.append(gap)
        previous = member
    return bytes(out)


def unpack_members(data: bytes) -> tuple[int, ...]:
    """The inverse of `pack_members`; raises BatchError unless `data` is exactly its canonical form."""
    if 0 in data:  # a zero gap, or a varint with a redundant last byte: not canonical
        raise BatchError("member gaps must be canonical LEB128 values of at least 1")
    if not data:
        return ()
    # The common cases, without a Python loop per member: after the first gap (the first member,
    # + 1), every gap the same (a worker's members as the assignment deals them: at a stride, or
    # consecutive), or every gap one byte.
    end = _varint_end(data)
    rest = data[end:]
    step = _varint_end(rest)
    if end and not rest:
        members: tuple[int, ...] = (_leb128(data) - 1,)
    elif end and step and rest == rest[:step] * (len(rest) // step):
        first, stride = _leb128(data[:end]) - 1, _leb128(rest[:step])
        members = tuple(range(first, first + stride * (len(rest) // step) + 1, stride))
    elif end and max(rest) < 0x80:
        members = tuple(accumulate(rest, initial=_leb128(data[:end]) - 1))
    else:
        members = _unpack_long(data)
    if members and members[-1] >= MEMBER_LIMIT:
        raise BatchError(f"member {members[-1]} does not fit a u32")
    return members


def _varint_end(data: bytes) -> int:
    """Where the LEB128 value `data` starts with ends, if within the 5 bytes of a u32 (else 0)."""
    head = data[:5]
    continued = len(head) - len(head.lstrip(_CONTINUED))
    return continued + 1 if continued < len(head) else 0


_CONTINUED = bytes(range(0x80, 0x100))  # LEB128 bytes with more to come


def _leb128(data: bytes) -> int:
    """The value of one whole LEB128 value."""
    if len(data) == 1:  # most gaps
        return data[0]
    value = 0
    for i, byte in enumerate(data):
        value |= (byte & 0x7F) << (7 * i)
    return value


def _unpack_long(data: bytes) -> tuple[int, ...]:
    out: list[int] = []
    previous, gap, shift = -1, 0, 0
    for byte in data:
        gap |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            previous += gap
            out.append(previous)
            gap, shift = 0, 0
    if shift:
        raise BatchError("member gaps end inside a LEB128 value")
    return tuple(out)


def pack_rewards(rewards: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(rewards)}d", *rewards)


def unpack_rewards(data: bytes, count: int) -> tuple[float, ...]:
    if len(data) != REWARD_BYTES * count:
        raise BatchError(f"{len(data)} reward bytes for {count} members; each reward is {REWARD_BYTES} bytes")
    return struct.unpack(f"<{count}d", data)


def payload(job_id: str, iteration: int, head_hash: bytes, worker_key: bytes, members: bytes, rewards: bytes) -> bytes:
    """The canonical bytes a batch signature covers (PROTOCOL §5.5): fixed-width or length-prefixed fields."""
    job = job_id.encode()
    return b"".join(
        (len(job).to_bytes(4, "little"), job, iteration.to_bytes(8, "little"), head_hash, worker_key, len(members).to_bytes(4, "little"), members, rewards)
    )


@dataclass(frozen=True)
class MemberResult:
    """One member's reward as one worker reported it (a counted replica)."""

    worker_key: bytes
    member: int
    reward: float


@dataclass(frozen=True)
class Batch:
    """One worker's signed rewards for some members of one iteration: the parsed view and the packed bytes it signed."""

    job_id: str
    iteration: int
    head_hash: bytes
    worker_key: bytes
    members: tuple[int, ...]
    rewards: tuple[float, ...]
    packed_members: bytes
    packed_rewards: bytes
    signature: bytes

    @cached_property
    def payload(self) -> bytes:
        return payload(self.job_id, self.iteration, self.head_hash, self.worker_key, self.packed_members, self.packed_rewards)

    @property
    def signed(self) -> tuple[bytes, bytes]:
        """(payload, signature): what a verifier checks, and what a worker vouches for as its own."""
        return self.payload, self.signature

    def results(self) -> list[MemberResult]:
        return [MemberResult(self.worker_key, m, r) for m, r in zip(self.members, self.rewards)]


def parts(job_id: str, iteration: int, head_hash: bytes, worker_key: bytes, members: bytes, rewards: bytes, signature: bytes) -> Batch:
    """A Batch from its packed parts; raises BatchError if they are malformed."""
    if len(worker_key) != KEY_BYTES or len(head_hash) != HEAD_BYTES:
        raise BatchError(f"worker key and head hash must be {KEY_BYTES} and {HEAD_BYTES} bytes")
    unpacked = unpack_members(members)
    return Batch(job_id, iteration, head_hash, worker_key, unpacked, unpack_rewards(rewards, len(unpacked)), members, rewards, signature)


def sign_batch(
    key: Ed25519PrivateKey, job_id: str, iteration: int, head_hash: bytes, members: Sequence[int], rewards: Sequence[float]
) -> Batch:
    """Pack (member, reward) pairs sorted by member and sign them once."""
    order = sorted(range(len(members)), key=members.__getitem__)
    packed_members = pack_members([members[i] for i in order])
    packed_rewards = pack_rewards([float(rewards[i]) for i in order])
    worker_key = identity.public_key_bytes(key)
    signature = identity.sign(key, identity.CONTEXT_BATCH, payload(job_id, iteration, head_hash, worker_key, packed_members, packed_rewards))
    return parts(job_id, iteration, head_hash, worker_key, packed_members, packed_rewards, signature)


def verify_batch(batch: Batch, public_key: Ed25519PublicKey | None = None) -> bool:
    """True iff the batch's worker key signed its payload (`public_key`: that key already loaded)."""
    key = batch.worker_key if public_key is None else public_key
    return identity.verify(key, identity.CONTEXT_BATCH, batch.payload, batch.signature)


def encode_batch(batch: Batch) -> bytes:
    """The wire form a worker submits (a serialized ResultBatch)."""
    return pb.ResultBatch(
        job_id=batch.job_id,
        iteration=batch.iteration,
        head_hash=batch.head_hash,
        worker_key=batch.worker_key,
        members=batch.packed_members,
        rewards=batch.packed_rewards,
        signature=batch.signature,
    ).SerializeToString()


def decode_batch(data: bytes) -> Batch:
    """Parse what a worker submitted; raises BatchError if malformed."""
    try:
        m = pb.ResultBatch.FromString(data)
    except DecodeError:
        raise BatchError("not a serialized ResultBatch") from None
    return parts(m.job_id, m.iteration, m.head_hash, m.worker_key, m.members, m.rewards, m.signature)


@dataclass(frozen=True)
class Recorded:
    """A batch as an iteration entry records it, with the members the iteration does not count from it."""

    batch: Batch
    excluded: tuple[int, ...] = ()

    def counted(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(members, rewards) this batch contributes, in member order."""
        if not self.excluded:
            return self.batch.members, self.batch.rewards
        left = set(self.excluded)
        kept = [(m, r) for m, r in zip(self.batch.members, self.batch.rewards) if m not in left]
        return tuple(m for m, _ in kept), tuple(r for _, r in kept)


def recorded_to_pb(recorded: Recorded, worker_delta: int) -> pb.RecordedBatch:
    """The batch as its entry records it; `worker_delta`: its key's index among the entry's workers
    less one more than the previous batch's (PROTOCOL §5.2)."""
    batch = recorded.batch
    return pb.RecordedBatch(
        worker_delta=worker_delta,
        members=batch.packed_members,
        rewards=batch.packed_rewards,
        signature=batch.signature,
        excluded=pack_members(recorded.excluded) if recorded.excluded else b"",
    )


def recorded_from_pb(message: pb.RecordedBatch, job_id: str, iteration: int, head_hash: bytes, worker_key: bytes) -> Recorded:
    """The view of a recorded batch (its job, iteration and head are its entry's, its key the one its
    worker index names); raises BatchError."""
    batch = parts(job_id, iteration, head_hash, worker_key, message.members, message.rewards, message.signature)
    return Recorded(batch, unpack_members(message.excluded) if message.excluded else ())


def tally(recorded: Iterable[Recorded]) -> tuple[dict[int, float], dict[int, list[float]]]:
    """(member -> its first counted reward, member -> every counted reward of a member that has several).
    Most members have one replica: a batch that repeats none of them is taken whole by dict.update."""
    first: dict[int, float] = {}
    several: dict[int, list[float]] = {}
    for item in recorded:
        members, rewards = item.counted()
        if first.keys().isdisjoint(members):
            first.update(zip(members, rewards))
            continue
        for member, reward in zip(members, rewards):
            if member in first:
                several.setdefault(member, [first[member]]).append(reward)
            else:
                first[member] = reward
    return first, several


def differing(several: Mapping[int, Sequence[float]]) -> list[int]:
    """The members whose counted rewards are not all equal, in member order."""
    return [m for m in sorted(several) if min(several[m]) != max(several[m])]


def settled_rewards(population: int, first: Mapping[int, float], several: Mapping[int, Sequence[float]], disputed: Sequence[float]) -> tuple[float, ...]:
    """Each member's reward: its counted replicas' common reward, else the next of `disputed` (0: none)."""
    out = list(map(first.get, range(population), repeat(0.0)))
    for member, reward in zip(differing(several), disputed):
        out[member] = reward
    return tuple(out)


def disputed_rewards(several: Mapping[int, Sequence[float]], standing: Mapping[int, float]) -> tuple[float, ...]:
    """What an entry records for `standing` (member -> settled reward): the rewards a reader cannot infer."""
    return tuple(standing[m] for m in differing(several))
