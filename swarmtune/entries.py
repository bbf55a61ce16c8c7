"""Ledger entries and worker-signed records: build, sign, parse (views over proto/ledger.proto)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields, replace
from functools import cached_property
from operator import attrgetter
from typing import Any, Callable, Generic, TypeVar, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from swarmtune import batches, identity
from swarmtune.batches import BatchError, MemberResult, Recorded
from swarmtune.seeds import MemberNoise, NoisePlan
from swarmtune.wire import ledger_pb2 as pb

HASH_BYTES = 32
# The protocol a genesis records (docs/PROTOCOL.md): v2 holds the master state as int32 (§2.2).
PROTOCOL_VERSION = "swarmtune/2"
LEGACY_PROTOCOLS = {
    "swarmtune/1": "version 1 ledger (swarmtune/1): replay it with swarmtune 0.1 (pip install 'swarmtune==0.1.*')",
}
ZERO_HASH = bytes(HASH_BYTES)  # prev_hash of genesis

# Job ids name Redis keys and files, so they are kept to a portable alphabet.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class EntryError(ValueError):
    """Bytes that are not a well-formed entry or record; `kind` is set once the kind is known."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


def entry_hash(stored: bytes) -> bytes:
    """The hash that chains entries: sha256 over exactly the stored bytes."""
    return hashlib.sha256(stored).digest()


def job_id_problem(job_id: str) -> str | None:
    if JOB_ID_PATTERN.fullmatch(job_id):
        return None
    return f"job id {job_id!r} must be 1-64 characters from A-Z a-z 0-9 . _ -"


def check_job_id(job_id: str) -> str:
    """`job_id` itself, or ValueError if it is not a valid job id."""
    problem = job_id_problem(job_id)
    if problem:
        raise ValueError(problem)
    return job_id


# ---- worker-signed records ------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionReport:
    """Held-out figures (name, value) a worker measured during an iteration."""

    job_id: str
    iteration: int
    head_hash: bytes
    worker_key: bytes
    figures: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Attestation:
    """A worker's claim: the state after `iteration` hashes to `state_hash`."""

    job_id: str
    iteration: int
    state_hash: bytes
    worker_key: bytes


Record = TypeVar("Record", RetentionReport, Attestation)


@dataclass(frozen=True)
class Signed(Generic[Record]):
    """A worker-signed record: the exact signed body bytes, the signature, and the parsed record."""

    record: Record
    body: bytes
    signature: bytes


@dataclass(frozen=True)
class _Codec:
    """How one record kind maps to protobuf, and the context its worker signs it under."""

    context: str
    body_type: Any
    signed_type: Any
    body_field: str
    values: Callable[[Any], tuple[Any, ...]]  # the record's fields, in order, from a message


def _codec(record_type: type, context: str, body_type: Any, signed_type: Any, body_field: str) -> _Codec:
    return _Codec(context, body_type, signed_type, body_field, attrgetter(*(f.name for f in fields(record_type))))


_CODECS: dict[type, _Codec] = {
    RetentionReport: _codec(
        RetentionReport, identity.CONTEXT_RETENTION, pb.RetentionReport, pb.SignedRetention, "report"
    ),
    Attestation: _codec(Attestation, identity.CONTEXT_ATTESTATION, pb.Attestation, pb.SignedAttestation, "attestation"),
}


def _record_to_pb(record: RetentionReport | Attestation) -> Any:
    values = {f.name: getattr(record, f.name) for f in fields(record)}
    if isinstance(record, RetentionReport):
        values["figures"] = [pb.Figure(name=name, value=value) for name, value in record.figures]
    return _CODECS[type(record)].body_type(**values)


def _record_from_pb(record_type: type[Record], message: Any) -> Record:
    values = _CODECS[record_type].values(message)
    if record_type is RetentionReport:  # its last field, figures, holds messages: make them pairs
        values = (*values[:-1], tuple((f.name, f.value) for f in message.figures))
    return record_type(*values)


def sign_record(key: Ed25519PrivateKey, record: Record) -> Signed[Record]:
    """Serialize `record` once and sign those bytes under its kind's context."""
    body = _record_to_pb(record).SerializeToString()
    return Signed(record, body, identity.sign(key, _CODECS[type(record)].context, body))


def verify_record(signed: Signed[Any], public_key: Ed25519PublicKey | None = None) -> bool:
    """True iff the record's worker key signed its body under the record kind's context.

    `public_key`, when given, is that worker key already loaded (verifiers keep them loaded).
    """
    key = signed.record.worker_key if public_key is None else public_key
    return identity.verify(key, _CODECS[type(signed.record)].context, signed.body, signed.signature)


def _signed_to_pb(signed: Signed[Any]) -> Any:
    codec = _CODECS[type(signed.record)]
    return codec.signed_type(**{codec.body_field: signed.body, "signature": signed.signature})


def encode_signed(signed: Signed[Any]) -> bytes:
    """The wire form a worker submits: Signed{body, signature} serialized."""
    return _signed_to_pb(signed).SerializeToString()


def _signed_from_pb(record_type: type[Record], message: Any) -> Signed[Record]:
    """The view of a Signed* message; raises DecodeError if its body is not a `record_type`."""
    codec = _CODECS[record_type]
    body = getattr(message, codec.body_field)
    return Signed(_record_from_pb(record_type, codec.body_type.FromString(body)), body, message.signature)


def decode_signed(record_type: type[Record], data: bytes) -> Signed[Record]:
    """Parse what a worker submitted (see `encode_signed`); raises EntryError if malformed."""
    try:
        return _signed_from_pb(record_type, _CODECS[record_type].signed_type.FromString(data))
    except DecodeError:
        raise EntryError(f"not a signed {record_type.__name__}") from None


# ---- entry bodies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One canonical tensor of the master state, as genesis plans it: its name, shape, fixed-point
    exponent F and how ES treats it."""

    name: str
    shape: tuple[int, ...]
    exponent: int
    treatment: str  # "dense" | "lowrank" | "frozen"

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class Genesis:
    job_spec: bytes
    job_spec_sha256: bytes
    base_state_hash: bytes
    coordinator_key: bytes
    protocol_version: str
    noise_version: str
    shaping_version: str
    tensor_plan: tuple[TensorSpec, ...] = ()
    admitted_workers: tuple[bytes, ...] = ()


def new_genesis(job_spec: bytes, base_state_hash: bytes, coordinator_key: bytes, **rest: Any) -> Genesis:
    """A Genesis whose spec digest is computed here; `rest` are the remaining Genesis fields."""
    return Genesis(job_spec, hashlib.sha256(job_spec).digest(), base_state_hash, coordinator_key, **rest)


@dataclass(frozen=True)
class Assignment:
    """A member given to a worker after the opening (PROTOCOL §6.6): `worker` indexes the entry's
    candidates followed by its others; `eligible` is a bitmap over the same list (bit i: byte i // 8,
    bit i % 8) of the workers that could take it then; `reason` is a pb.Assignment.Reason."""

    member: int
    worker: int
    reason: int
    eligible: bytes


@dataclass(frozen=True)
class Iteration:
    """An iteration entry's body. The per-member views (members, results, rewards) are derived once, when asked."""

    iteration: int
    opened_head: bytes
    plan: NoisePlan
    batches: tuple[Recorded, ...]
    # §3's coefficients, one per member. Not recorded: an entry parsed on its own has none; the
    # verified walk (ledger.walk) and the coordinator's close derive them from the rewards (coefficients.py).
    coefficients: tuple[int, ...]
    disputed: tuple[float, ...]  # settled rewards of the members whose counted rewards differ, in member order
    shaping: str
    retention: tuple[Signed[RetentionReport], ...] = ()
    alerts: tuple[str, ...] = ()
    draw: bytes = b""  # the coordinator's signature that ordered candidates and chose spot checks
    candidates: tuple[bytes, ...] = ()  # worker keys that could take members at opening, in the draw's order
    capacities: tuple[int, ...] = ()  # what each candidate asked for at opening
    operators: tuple[int, ...] = ()  # per candidate, the first candidate of its operator (empty: all distinct)
    others: tuple[bytes, ...] = ()  # workers of later assignments, then of batches, that are not candidates
    assignments: tuple[Assignment, ...] = ()  # later assignments, in the order given

    @cached_property
    def members(self) -> tuple[MemberNoise, ...]:
        return self.plan.members(self.iteration)

    @cached_property
    def results(self) -> tuple[MemberResult, ...]:
        """Every counted replica, batch by batch."""
        return tuple(
            MemberResult(recorded.batch.worker_key, m, r) for recorded in self.batches for m, r in zip(*recorded.counted())
        )

    @cached_property
    def counted(self) -> tuple[dict[int, float], dict[int, list[float]]]:
        """(member -> its first counted reward, member -> every counted reward where it has several)."""
        return batches.tally(self.batches)

    def replicated(self) -> list[MemberResult]:
        """The counted replicas of the members that have several: the only ones that can disagree."""
        several = self.counted[1]
        if not several:
            return []
        return [MemberResult(r.batch.worker_key, m, x) for r in self.batches for m, x in zip(*r.counted()) if m in several]

    @cached_property
    def rewards(self) -> tuple[float, ...]:
        """The reward shaping used, per member (0 for a member without a counted replica)."""
        first, several = self.counted
        return batches.settled_rewards(self.plan.population, first, several, self.disputed)

    def with_coefficients(self, coefficients: tuple[int, ...]) -> Iteration:
        """This body with `coefficients`. The views derived from its batches and plan do not depend on
        them: those already computed carry over instead of being computed again by later readers."""
        derived = replace(self, coefficients=coefficients)
        views = {name: value for name, value in vars(self).items() if name not in _ITERATION_FIELDS}
        vars(derived).update(views)
        return derived

    @property
    def rewarded(self) -> tuple[float, ...]:
        """The rewards of the members with a counted replica, in member order (what shaping saw)."""
        rewards = self.rewards
        if len(self.counted[0]) == len(rewards):  # every member rewarded (the common case)
            return rewards
        return tuple(rewards[m] for m in sorted(self.counted[0]))


_ITERATION_FIELDS = frozenset(f.name for f in fields(Iteration))

ROLE_REFEREE = "referee"  # an operator-trusted key whose reward settles a member


@dataclass(frozen=True)
class Admission:
    worker_key: bytes
    reason: str
    operator_fingerprint: str
    role: str = ""  # "" or ROLE_REFEREE


@dataclass(frozen=True)
class Revocation:
    worker_key: bytes
    reason: str
    operator_fingerprint: str


@dataclass(frozen=True)
class Checkpoint:
    iteration: int
    state_hash: bytes
    attestations: tuple[Signed[Attestation], ...]
    quorum: int


Body = Union[Genesis, Iteration, Admission, Revocation, Signed[Attestation], Checkpoint]


@dataclass(frozen=True)
class Entry:
    """The envelope the coordinator signs."""

    index: int
    prev_hash: bytes
    job_id: str
    timestamp_ms: int
    body: Body

    @property
    def kind(self) -> str:
        return body_kind(self.body)


@dataclass(frozen=True)
class StoredEntry:
    """A parsed stored entry: the view, the exact signed envelope, its signature, and its hash."""

    entry: Entry
    envelope: bytes
    signature: bytes
    stored: bytes
    hash: bytes

    @property
    def kind(self) -> str:
        return self.entry.kind


_BODY_KINDS: dict[type, str] = {
    Genesis: "genesis",
    Iteration: "iteration",
    Admission: "admission",
    Revocation: "revocation",
    Checkpoint: "checkpoint",
}


def body_kind(body: Body) -> str:
    """The entry kind: the name of the `Entry.body` oneof field that carries `body`."""
    if isinstance(body, Signed):
        return "attestation"
    return _BODY_KINDS[type(body)]


def _body_to_pb(body: Body) -> Any:
    if isinstance(body, Signed):
        return _signed_to_pb(body)
    if isinstance(body, Genesis):
        plan = [
            pb.TensorSpec(name=t.name, shape=t.shape, exponent=t.exponent, treatment=t.treatment)
            for t in body.tensor_plan
        ]
        values = {f.name: getattr(body, f.name) for f in fields(body)}
        return pb.Genesis(**{**values, "tensor_plan": plan})
    if isinstance(body, Iteration):
        others = recorded_others(body)
        index = {key: i for i, key in enumerate((*body.candidates, *others))}
        workers = [-1, *(index[r.batch.worker_key] for r in body.batches)]
        return pb.Iteration(
            iteration=body.iteration,
            opened_head=body.opened_head,
            plan=plan_to_pb(body.plan),
            batches=[batches.recorded_to_pb(r, now - before - 1) for r, before, now in zip(body.batches, workers, workers[1:])],
            disputed=body.disputed,
            shaping=body.shaping,
            retention=[_signed_to_pb(r) for r in body.retention],
            alerts=body.alerts,
            draw=body.draw,
            candidates=body.candidates,
            capacities=body.capacities,
            operators=body.operators,
            others=others,
            assignments=[assignment_to_pb(a) for a in body.assignments],
        )
    if isinstance(body, (Admission, Revocation)):
        return pb.WorkerKey(
            worker_key=body.worker_key,
            reason=body.reason,
            operator_fingerprint=body.operator_fingerprint,
            role=body.role if isinstance(body, Admission) else "",
        )
    return pb.Checkpoint(
        iteration=body.iteration,
        state_hash=body.state_hash,
        attestations=[_signed_to_pb(a) for a in body.attestations],
        quorum=body.quorum,
    )


def _signed_list(record_type: type[Record], messages: Any, what: str, kind: str) -> tuple[Signed[Record], ...]:
    out: list[Signed[Record]] = []
    try:
        for message in messages:
            out.append(_signed_from_pb(record_type, message))
    except DecodeError:
        raise EntryError(f"{what} {len(out)}: signed body is not a {record_type.__name__}", kind) from None
    return tuple(out)


def recorded_others(body: Iteration) -> tuple[bytes, ...]:
    """The `others` an entry records: the body's, then each batch worker that is neither a candidate
    nor among them, in batch order (a batch names its worker by index). Raises ValueError when that
    would add workers to an entry with later assignments: their eligible bitmaps span the list."""
    named = {*body.candidates, *body.others}
    missing = dict.fromkeys(r.batch.worker_key for r in body.batches if r.batch.worker_key not in named)
    if missing and body.assignments:
        raise ValueError("batch workers missing from others of an entry with later assignments: name them in assignlog.encode")
    return (*body.others, *missing)


def assignment_to_pb(assignment: Assignment) -> pb.Assignment:
    return pb.Assignment(member=assignment.member, worker=assignment.worker, reason=assignment.reason, eligible=assignment.eligible)


def assignment_from_pb(message: pb.Assignment) -> Assignment:
    return Assignment(message.member, message.worker, message.reason, message.eligible)


def plan_to_pb(plan: NoisePlan) -> pb.NoisePlan:
    return pb.NoisePlan(job_seed=plan.job_seed, population=plan.population, antithetic=plan.antithetic)


def plan_from_pb(message: pb.NoisePlan) -> NoisePlan:
    return NoisePlan(message.job_seed, message.population, message.antithetic)


def _recorded_list(message: Any, job_id: str) -> tuple[Recorded, ...]:
    out: list[Recorded] = []
    workers = (*message.candidates, *message.others)
    index = -1
    try:
        for recorded in message.batches:
            index += 1 + recorded.worker_delta
            if not 0 <= index < len(workers):
                raise BatchError(f"its worker index {index} is not among the entry's {len(workers)} workers")
            out.append(batches.recorded_from_pb(recorded, job_id, message.iteration, message.opened_head, workers[index]))
    except BatchError as exc:
        raise EntryError(f"batch {len(out)}: {exc}", "iteration") from None
    return tuple(out)


def _body_from_pb(kind: str, message: Any, job_id: str) -> Body:
    if kind == "genesis":
        plan = tuple(TensorSpec(t.name, tuple(t.shape), t.exponent, t.treatment) for t in message.tensor_plan)
        values = {f.name: getattr(message, f.name) for f in fields(Genesis)}
        return Genesis(**{**values, "tensor_plan": plan, "admitted_workers": tuple(message.admitted_workers)})
    if kind == "iteration":
        return Iteration(
            iteration=message.iteration,
            opened_head=message.opened_head,
            plan=plan_from_pb(message.plan),
            batches=_recorded_list(message, job_id),
            coefficients=(),
            disputed=tuple(message.disputed),
            shaping=message.shaping,
            retention=_signed_list(RetentionReport, message.retention, "retention report", kind),
            alerts=tuple(message.alerts),
            draw=message.draw,
            candidates=tuple(message.candidates),
            capacities=tuple(message.capacities),
            operators=tuple(message.operators),
            others=tuple(message.others),
            assignments=tuple(map(assignment_from_pb, message.assignments)),
        )
    if kind == "admission":
        return Admission(message.worker_key, message.reason, message.operator_fingerprint, message.role)
    if kind == "revocation":
        return Revocation(message.worker_key, message.reason, message.operator_fingerprint)
    if kind == "attestation":
        return _signed_list(Attestation, [message], "attestation", kind)[0]
    return Checkpoint(
        iteration=message.iteration,
        state_hash=message.state_hash,
        attestations=_signed_list(Attestation, message.attestations, "attestation", kind),
        quorum=message.quorum,
    )


# ---- sealing and parsing entries ------------------------------------------------------------


def first_entry(job_id: str, genesis: Genesis, timestamp_ms: int) -> Entry:
    return Entry(0, ZERO_HASH, check_job_id(job_id), timestamp_ms, genesis)


def next_entry(previous: StoredEntry, body: Body, timestamp_ms: int) -> Entry:
    """The entry that follows `previous` in its chain."""
    return Entry(previous.entry.index + 1, previous.hash, previous.entry.job_id, timestamp_ms, body)


def seal(key: Ed25519PrivateKey, entry: Entry) -> bytes:
    """Serialize the envelope once, sign it, and return the stored bytes (a SignedEntry)."""
    envelope = pb.Entry(
        index=entry.index,
        prev_hash=entry.prev_hash,
        job_id=check_job_id(entry.job_id),
        timestamp_ms=entry.timestamp_ms,
        **{entry.kind: _body_to_pb(entry.body)},
    ).SerializeToString()
    signature = identity.sign(key, identity.CONTEXT_ENTRY, envelope)
    return pb.SignedEntry(entry=envelope, signature=signature).SerializeToString()


@dataclass(frozen=True)
class EntryHeader:
    """What the store needs to chain an entry (read without building views of its body)."""

    index: int
    prev_hash: bytes
    job_id: str
    hash: bytes
    kind: str | None  # the body's kind (body_kind); None when the entry has none


def _envelope(stored: bytes) -> tuple[Any, Any]:
    try:
        signed = pb.SignedEntry.FromString(stored)
        return signed, pb.Entry.FromString(signed.entry)
    except DecodeError:
        raise EntryError("not a SignedEntry holding an Entry (corrupt bytes)") from None


def read_header(stored: bytes) -> EntryHeader:
    _, message = _envelope(stored)
    return EntryHeader(message.index, message.prev_hash, message.job_id, entry_hash(stored), message.WhichOneof("body"))


def parse_entry(stored: bytes) -> StoredEntry:
    """Parse exactly the stored bytes (never re-serialized); raises EntryError if malformed."""
    signed, message = _envelope(stored)
    kind = message.WhichOneof("body")
    if kind is None:
        raise EntryError("entry has no body (unknown kind: written by a newer swarmtune?)")
    body = _body_from_pb(kind, getattr(message, kind), message.job_id)
    entry = Entry(message.index, message.prev_hash, message.job_id, message.timestamp_ms, body)
    return StoredEntry(entry, signed.entry, signed.signature, stored, entry_hash(stored))


def verify_seal(stored: StoredEntry, coordinator_key: bytes | Ed25519PublicKey) -> bool:
    return identity.verify(coordinator_key, identity.CONTEXT_ENTRY, stored.envelope, stored.signature)
