"""The iteration digest: what a live worker applies instead of a full iteration entry (PROTOCOL §6.4)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from swarmtune import entries, identity, ledger
from swarmtune.entries import EntryError, Iteration, NoisePlan, StoredEntry
from swarmtune.wire import ledger_pb2 as pb


@dataclass(frozen=True)
class Digest:
    """An iteration entry as the coordinator vouches for it to workers: where it sits in the chain, the
    hash that commits to the full entry (batches included), and what applying it needs."""

    index: int
    prev_hash: bytes
    entry_hash: bytes
    job_id: str
    iteration: int
    opened_head: bytes
    plan: NoisePlan
    coefficients: tuple[int, ...]

    def as_iteration(self) -> Iteration:
        """The update this digest carries, as an Iteration body without batches (what an apply reads)."""
        return Iteration(self.iteration, self.opened_head, self.plan, (), self.coefficients, (), "")


def digest_of(stored: StoredEntry) -> Digest:
    body = stored.entry.body
    if not isinstance(body, Iteration):
        raise ValueError(f"entry {stored.entry.index} is a {stored.kind}, not an iteration")
    entry = stored.entry
    return Digest(entry.index, entry.prev_hash, stored.hash, entry.job_id, body.iteration, body.opened_head, body.plan, body.coefficients)


def seal_digest(key: Ed25519PrivateKey, digest: Digest) -> bytes:
    """The serialized SignedDigest (context "iteration-digest")."""
    message = pb.IterationDigest(
        index=digest.index,
        prev_hash=digest.prev_hash,
        entry_hash=digest.entry_hash,
        job_id=digest.job_id,
        iteration=digest.iteration,
        opened_head=digest.opened_head,
        plan=entries.plan_to_pb(digest.plan),
        coefficients=digest.coefficients,
    ).SerializeToString()
    return pb.SignedDigest(digest=message, signature=identity.sign(key, identity.CONTEXT_DIGEST, message)).SerializeToString()


def open_digest(data: bytes, coordinator_key: bytes | Ed25519PublicKey) -> Digest:
    """The digest in a SignedDigest, once the coordinator's signature over it verifies; raises EntryError."""
    try:
        signed = pb.SignedDigest.FromString(data)
        m = pb.IterationDigest.FromString(signed.digest)
    except DecodeError:
        raise EntryError("not a SignedDigest holding an IterationDigest", "iteration") from None
    if not identity.verify(coordinator_key, identity.CONTEXT_DIGEST, signed.digest, signed.signature):
        raise EntryError("iteration digest: coordinator signature invalid", "iteration")
    plan = entries.plan_from_pb(m.plan)
    return Digest(m.index, m.prev_hash, m.entry_hash, m.job_id, m.iteration, m.opened_head, plan, tuple(m.coefficients))


def _digest_problem(state: ledger.ChainState, digest: Digest) -> str | None:
    if digest.index != state.next_index or digest.prev_hash != state.head_hash:
        return f"digest of entry {digest.index} does not follow entry {state.next_index - 1} of our chain"
    if digest.job_id != state.job_id:
        return f"belongs to job {digest.job_id!r}, not {state.job_id!r}"
    if digest.iteration != state.last_iteration + 1:
        return f"iteration {digest.iteration}, expected {state.last_iteration + 1}"
    if digest.opened_head not in state.open_heads:
        return "opened_head is not the hash of an entry since the previous iteration"
    if len(digest.coefficients) != digest.plan.population:
        return f"{digest.plan.population} members but {len(digest.coefficients)} coefficients"
    return ledger.population_problem(digest.as_iteration())


def advance_digest(state: ledger.ChainState, data: bytes) -> tuple[ledger.ChainState, Digest]:
    """Take an iteration entry by its coordinator-signed digest (PROTOCOL §6.4): the seal, its place in
    the chain and its update are checked; its batches are not (they are not here: fetch the entry to
    check them). The chain moves to the entry hash the digest commits to."""
    try:
        digest = open_digest(data, state.coordinator_key)
    except EntryError as exc:
        raise ledger.LedgerError(state.next_index, "iteration", str(exc)) from None
    problem = _digest_problem(state, digest)
    if problem:
        raise ledger.LedgerError(state.next_index, "iteration", problem)
    moved = replace(state, next_index=state.next_index + 1, head_hash=digest.entry_hash)
    return replace(moved, last_iteration=digest.iteration, open_heads=frozenset([digest.entry_hash])), digest
