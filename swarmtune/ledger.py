"""Pure verification of a ledger: chain, coordinator seals, worker signatures, admissions, bindings."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from swarmtune import assignlog, batches, coefficients, draw, entries, identity, shaping
from swarmtune.batches import Recorded
from swarmtune.entries import (
    Admission,
    Attestation,
    Checkpoint,
    Genesis,
    Iteration,
    Revocation,
    Signed,
    StoredEntry,
)
from swarmtune.precheck import Signature, prechecked

OTHER_HEAD = "bound to another ledger head than the one the iteration opened at"

# (payload, signature) pairs of result batches whose signatures the verifying party has established: a
# worker's own (it made them), or batches checked ahead on other threads (precheck). Everything else
# about them is still checked.
Vouched = Collection[Signature]


class LedgerError(Exception):
    """Entry `index` (of kind `kind`) breaks the ledger; the message says how."""

    def __init__(self, index: int, kind: str, message: str) -> None:
        super().__init__(f"entry {index} ({kind}): {message}")
        self.index = index
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class ChainState:
    """What verifying entries 0..next_index-1 established; the input to checking the next one."""

    job_id: str
    coordinator_key: Ed25519PublicKey
    base_state_hash: bytes
    next_index: int
    head_hash: bytes
    admitted: Mapping[bytes, Ed25519PublicKey]  # loaded once at admission, used for every batch
    revoked: frozenset[bytes]
    last_iteration: int
    # Hashes of the last iteration entry (or genesis) and every entry after it: the heads an
    # open iteration may have been opened at (admissions can land while an iteration is open).
    open_heads: frozenset[bytes]
    referees: frozenset[bytes] = frozenset()  # admitted with the referee role
    rule: shaping.Rule | None = None  # the genesis job spec's shaping (None: it does not parse)


def _worker_problem(state: ChainState, worker_key: bytes) -> str | None:
    if worker_key in state.admitted:
        return None
    if worker_key in state.revoked:
        return f"worker {identity.fingerprint(worker_key)} was revoked"
    return f"worker {identity.fingerprint(worker_key)} is not admitted"


def _signed_problem(state: ChainState, signed: Signed[Any], iteration: int) -> str | None:
    """Problems every worker-signed record can have; the signature is checked last (costliest)."""
    record = signed.record
    problem = _worker_problem(state, record.worker_key)
    if problem:
        return problem
    if record.job_id != state.job_id:
        return f"bound to job {record.job_id!r}, not {state.job_id!r}"
    if record.iteration != iteration:
        return f"bound to iteration {record.iteration}, not {iteration}"
    if not entries.verify_record(signed, state.admitted[record.worker_key]):
        return "worker signature invalid"
    return None


def _records_problem(
    state: ChainState, records: Iterable[Signed[Any]], iteration: int, label: str, bound: Callable[[Any], str | None]
) -> str | None:
    """The first problem among worker-signed records that must also satisfy `bound`."""
    for i, signed in enumerate(records):
        problem = _signed_problem(state, signed, iteration) or bound(signed.record)
        if problem:
            return f"{label} {i}: {problem}"
    return None


def batch_problem(state: ChainState, recorded: Recorded, population: int, vouched: Vouched = ()) -> str | None:
    """Why a recorded batch does not belong to its iteration entry (None if it does). Its job, iteration
    and head are the entry's own by construction: the signature covers them."""
    batch = recorded.batch
    problem = _worker_problem(state, batch.worker_key)
    if problem:
        return problem
    if batch.members and batch.members[-1] >= population:
        return f"member {batch.members[-1]} is not in the iteration (population {population})"
    if recorded.excluded and not set(recorded.excluded) <= set(batch.members):
        return "excludes members the batch does not hold"
    _, rewards = recorded.counted()
    if not all(map(math.isfinite, rewards)):
        return f"counts reward {next(r for r in rewards if not math.isfinite(r))}, which is not finite"
    if batch.signed not in vouched and not batches.verify_batch(batch, state.admitted[batch.worker_key]):
        return "worker signature invalid"
    return None


def _batches_problem(state: ChainState, iteration: Iteration, vouched: Vouched) -> str | None:
    """Each batch sound, and no worker counted twice for one member."""
    held: dict[bytes, set[int]] = {}
    for i, recorded in enumerate(iteration.batches):
        problem = batch_problem(state, recorded, iteration.plan.population, vouched)
        if problem:
            return f"batch {i}: {problem}"
        members, _ = recorded.counted()
        mine = held.setdefault(recorded.batch.worker_key, set())
        if not mine.isdisjoint(members):
            return f"batch {i}: a second result from the same worker for member {min(mine.intersection(members))}"
        mine.update(members)
    return None


def population_problem(iteration: Iteration) -> str | None:
    """Why an iteration's plan does not describe a population (None if it does)."""
    n = iteration.plan.population
    if n < 1:
        return "population must be at least 1"
    if iteration.plan.antithetic and n % 2:
        return f"antithetic sampling needs an even population, got {n}"
    return None


def _reward_problem(iteration: Iteration) -> str | None:
    """A member whose replicas differ settles on one of their rewards, recorded in order in `disputed`."""
    _, several = iteration.counted
    disputed = batches.differing(several)
    if len(disputed) != len(iteration.disputed):
        return f"{len(disputed)} members' replicas differ but {len(iteration.disputed)} disputed rewards are recorded"
    for member, reward in zip(disputed, iteration.disputed):
        if reward not in several[member]:
            return f"member {member}'s reward {reward} is none of its results' rewards {sorted(several[member])}"
    return None


def _iteration_problem(state: ChainState, iteration: Iteration, vouched: Vouched) -> str | None:
    expected = state.last_iteration + 1
    if iteration.iteration != expected:
        return f"iteration {iteration.iteration}, expected {expected}"
    if iteration.opened_head not in state.open_heads:
        return "opened_head is not the hash of an entry since the previous iteration"
    problem = (
        population_problem(iteration)
        or _draw_problem(state, iteration)
        or _batches_problem(state, iteration, vouched)
        or _named_problem(state, iteration)
    )
    if problem:
        return problem
    problem = _records_problem(
        state, iteration.retention, iteration.iteration, "retention report",
        lambda report: None if report.head_hash == iteration.opened_head else OTHER_HEAD,
    )  # fmt: skip
    return problem or _reward_problem(iteration)


def _attestation_problem(state: ChainState, signed: Signed[Attestation]) -> str | None:
    if signed.record.iteration > state.last_iteration:
        return f"attests iteration {signed.record.iteration}, beyond the last iteration {state.last_iteration}"
    return _signed_problem(state, signed, signed.record.iteration)


def _checkpoint_problem(state: ChainState, checkpoint: Checkpoint) -> str | None:
    if checkpoint.iteration > state.last_iteration:
        return f"checkpoint of iteration {checkpoint.iteration}, beyond the last iteration {state.last_iteration}"
    if checkpoint.iteration == 0 and checkpoint.state_hash != state.base_state_hash:
        return "checkpoint of iteration 0 does not carry the genesis base state hash"
    if checkpoint.quorum < 1:
        return "quorum must be at least 1"
    problem = _records_problem(
        state, checkpoint.attestations, checkpoint.iteration, "attestation",
        lambda attestation: None if attestation.state_hash == checkpoint.state_hash else "attests another state hash",
    )  # fmt: skip
    if problem:
        return problem
    attestors = {signed.record.worker_key for signed in checkpoint.attestations}
    if len(attestors) < checkpoint.quorum:
        return f"{len(attestors)} distinct attestors, quorum is {checkpoint.quorum}"
    return None


def _key_problem(key: bytes) -> str | None:
    try:
        identity.load_public_key(key)
    except ValueError as exc:
        return f"worker key invalid: {exc}"
    return None


def _genesis_problem(genesis: Genesis, expected_key: bytes | None) -> str | None:
    if genesis.protocol_version in entries.LEGACY_PROTOCOLS:
        return entries.LEGACY_PROTOCOLS[genesis.protocol_version]
    if genesis.protocol_version != entries.PROTOCOL_VERSION:
        return (
            f"protocol {genesis.protocol_version!r} is not this swarmtune's {entries.PROTOCOL_VERSION!r}: "
            "use the swarmtune release that wrote this ledger"
        )
    if hashlib.sha256(genesis.job_spec).digest() != genesis.job_spec_sha256:
        return "job_spec_sha256 is not the sha256 of job_spec"
    if len(genesis.base_state_hash) != entries.HASH_BYTES:
        return "base_state_hash must be 32 bytes"
    if expected_key is not None and genesis.coordinator_key != expected_key:
        return f"coordinator key {identity.fingerprint(genesis.coordinator_key)} is not the expected one"
    for key in (genesis.coordinator_key, *genesis.admitted_workers):
        problem = _key_problem(key)
        if problem:
            return problem
    return None


def _genesis_entry_problem(entry: StoredEntry, expected_key: bytes | None) -> str | None:
    body = entry.entry.body
    if not isinstance(body, Genesis):
        return "the first entry must be a genesis"
    if entry.entry.index != 0 or entry.entry.prev_hash != entries.ZERO_HASH:
        return "genesis must have index 0 and 32 zero bytes as prev_hash"
    problem = entries.job_id_problem(entry.entry.job_id) or _genesis_problem(body, expected_key)
    if problem:
        return problem
    if not entries.verify_seal(entry, body.coordinator_key):
        return "coordinator signature invalid"
    return None


def _draw_problem(state: ChainState, iteration: Iteration) -> str | None:
    """The draw is the coordinator's signature over (job, iteration, opened head), the candidates are
    distinct admitted keys in the order it implies, the others distinct admitted keys besides them,
    and the later assignments are well-formed (an entry without a draw records no candidate and no
    assignment; its others name its batches' workers)."""
    if not iteration.draw and (iteration.candidates or iteration.assignments):
        return "candidates recorded without a draw"
    problem = assignlog.form_problem(iteration)
    if problem:
        return problem
    if iteration.draw and not draw.verify_draw(state.coordinator_key, state.job_id, iteration.iteration, iteration.opened_head, iteration.draw):
        return "draw is not the coordinator's signature over (job, iteration, opened_head)"
    if iteration.draw and list(iteration.candidates) != draw.keyed_order(iteration.draw, iteration.candidates):
        return "candidates are not distinct keys in the order the draw implies"
    return None


def _named_problem(state: ChainState, iteration: Iteration) -> str | None:
    """Every worker the entry names (candidates, others) was admitted; a candidate may have been
    revoked by this very close, between opening and the entry."""
    stranger = next((key for key in (*iteration.candidates, *iteration.others) if key not in state.admitted and key not in state.revoked), None)
    return None if stranger is None else f"worker {identity.fingerprint(stranger)} of the assignment was never admitted"


def _admission_problem(state: ChainState, admission: Admission) -> str | None:
    who = identity.fingerprint(admission.worker_key)
    if admission.role not in ("", entries.ROLE_REFEREE):
        return f"role {admission.role!r} is neither a worker's ('') nor {entries.ROLE_REFEREE!r}"
    promoted = admission.role == entries.ROLE_REFEREE and admission.worker_key not in state.referees
    if admission.worker_key in state.admitted and not promoted:
        return f"worker {who} is already admitted"
    if admission.worker_key in state.revoked:
        return f"worker {who} was revoked; revoked keys stay revoked"
    return _key_problem(admission.worker_key)


def _started(entry: StoredEntry, coordinator_key: bytes | None) -> ChainState:
    problem = _genesis_entry_problem(entry, coordinator_key)
    if problem:
        raise LedgerError(0, entry.kind, problem)
    body = cast(Genesis, entry.entry.body)
    return ChainState(
        job_id=entry.entry.job_id,
        coordinator_key=identity.load_public_key(body.coordinator_key),
        base_state_hash=body.base_state_hash,
        next_index=1,
        head_hash=entry.hash,
        admitted=MappingProxyType({key: identity.load_public_key(key) for key in body.admitted_workers}),
        revoked=frozenset(),
        last_iteration=0,
        open_heads=frozenset([entry.hash]),
        rule=coefficients.rule_of(body),
    )


def _body_problem(state: ChainState, body: entries.Body, vouched: Vouched) -> str | None:
    if isinstance(body, Iteration):
        return _iteration_problem(state, body, vouched)
    if isinstance(body, Admission):
        return _admission_problem(state, body)
    if isinstance(body, Revocation):
        return _worker_problem(state, body.worker_key)
    if isinstance(body, Checkpoint):
        return _checkpoint_problem(state, body)
    if isinstance(body, Signed):
        return _attestation_problem(state, body)
    return "a second genesis"


def _after(state: ChainState, entry: StoredEntry) -> ChainState:
    body = entry.entry.body
    moved = replace(state, next_index=state.next_index + 1, head_hash=entry.hash)
    if isinstance(body, Iteration):
        return replace(moved, last_iteration=body.iteration, open_heads=frozenset([entry.hash]))
    opened = replace(moved, open_heads=state.open_heads | {entry.hash})
    if isinstance(body, Admission):
        admitted = {**state.admitted, body.worker_key: identity.load_public_key(body.worker_key)}
        referees = state.referees | {body.worker_key} if body.role == entries.ROLE_REFEREE else state.referees
        return replace(opened, admitted=MappingProxyType(admitted), referees=referees)
    if isinstance(body, Revocation):
        remaining = {key: loaded for key, loaded in state.admitted.items() if key != body.worker_key}
        return replace(opened, admitted=MappingProxyType(remaining), revoked=state.revoked | {body.worker_key})
    return opened


def _entry_problem(state: ChainState, entry: StoredEntry, vouched: Vouched) -> str | None:
    index = state.next_index
    if entry.entry.index != index:
        return f"has index {entry.entry.index} at position {index} (an entry is missing, repeated or moved)"
    if entry.entry.prev_hash != state.head_hash:
        return f"prev_hash is not the hash of entry {index - 1} (an entry was changed, removed or moved)"
    if entry.entry.job_id != state.job_id:
        return f"belongs to job {entry.entry.job_id!r}, not {state.job_id!r}"
    if not entries.verify_seal(entry, state.coordinator_key):
        return "coordinator signature invalid"
    return _body_problem(state, entry.entry.body, vouched)


def _advanced(state: ChainState, entry: StoredEntry, vouched: Vouched) -> ChainState:
    problem = _entry_problem(state, entry, vouched)
    if problem:
        raise LedgerError(state.next_index, entry.kind, problem)
    return _after(state, entry)


def walk(
    stored_entries: Iterable[bytes],
    state: ChainState | None = None,
    coordinator_key: bytes | None = None,
    vouched: Vouched = (),
    threads: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> Iterator[tuple[ChainState, StoredEntry]]:
    """THE verified walk over a ledger: each entry parsed once, checked against the chain so far, then
    yielded with the chain state after it (an iteration entry with its coefficients derived). From genesis (`state` None, optionally pinning the
    coordinator key) or from a state already reached; raises LedgerError at the first bad entry.
    Result batches' signatures are checked ahead on `pool` (kept by the caller across walks) or else on
    `threads` threads (None: one per CPU); those in `vouched` are taken as made (a worker's own)."""
    for parsed, checked in prechecked(stored_entries, threads, vouched, pool):
        index = 0 if state is None else state.next_index
        if isinstance(parsed, entries.EntryError):
            raise LedgerError(index, parsed.kind or "unknown", f"malformed: {parsed}")
        if state is None:
            state = _started(parsed, coordinator_key)
        else:
            state = _advanced(state, parsed, {*vouched, *checked} if vouched else checked)
        yield state, coefficients.with_coefficients(parsed, state.rule)


def start(stored: bytes, coordinator_key: bytes | None = None) -> tuple[ChainState, StoredEntry]:
    """Check a genesis entry (optionally pinning the coordinator key): the chain state after it."""
    return next(walk([stored], coordinator_key=coordinator_key, threads=1))


def advance(state: ChainState, stored: bytes, vouched: Vouched = ()) -> tuple[ChainState, StoredEntry]:
    """Check the entry that follows `state`; raises LedgerError naming what is wrong. Batch signatures
    in `vouched` are taken as made; they must still match their records exactly."""
    return next(walk([stored], state, vouched=vouched, threads=1))


@dataclass(frozen=True)
class Problem:
    """The first bad entry (index None: the container, e.g. a ledger file, is bad)."""

    index: int | None
    kind: str
    message: str

    def describe(self) -> str:
        where = "ledger file" if self.index is None else f"entry {self.index} ({self.kind})"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Report:
    """The outcome of verifying a ledger: what was sound, and the first problem if any."""

    entries: int
    job_id: str | None
    head_hash: bytes | None
    kinds: Mapping[str, int]
    worker_signatures: int
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        problem = None if self.problem is None else asdict(self.problem)
        return {
            "ok": self.ok,
            "job_id": self.job_id,
            "entries": self.entries,
            "head_hash": self.head_hash.hex() if self.head_hash else None,
            "kinds": dict(self.kinds),
            "worker_signatures": self.worker_signatures,
            "problem": problem,
        }


def _signature_count(entry: StoredEntry) -> int:
    body = entry.entry.body
    if isinstance(body, Iteration):
        return len(body.batches) + len(body.retention)
    if isinstance(body, Checkpoint):
        return len(body.attestations)
    return 1 if isinstance(body, Signed) else 0


def failed(problem: Problem) -> Report:
    return Report(0, None, None, {}, 0, problem)


def verify_chain(
    stored_entries: Iterable[bytes],
    coordinator_key: bytes | None = None,
    threads: int | None = None,
    on_entry: Callable[[StoredEntry], None] | None = None,
) -> Report:
    """Verify a whole ledger, stopping at the first bad entry; batches' signatures on `threads` threads
    (None: one per CPU); `on_entry` sees each entry once it verified (the audit's further checks).
    Never raises on bad input."""
    state: ChainState | None = None
    kinds: Counter[str] = Counter()
    signatures = 0
    problem = None
    try:
        for state, entry in walk(stored_entries, coordinator_key=coordinator_key, threads=threads):
            kinds[entry.kind] += 1
            signatures += _signature_count(entry)
            if on_entry:
                on_entry(entry)
    except LedgerError as exc:
        problem = Problem(exc.index, exc.kind, exc.message)
    if state is None and problem is None:
        problem = Problem(0, "none", "the ledger is empty (no genesis)")
    return Report(
        entries=state.next_index if state else 0,
        job_id=state.job_id if state else None,
        head_hash=state.head_hash if state else None,
        kinds=dict(kinds),
        worker_signatures=signatures,
        problem=problem,
    )
