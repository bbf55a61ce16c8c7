"""Builds real signed ledgers for tests: a coordinator, workers, and entries of every kind."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import batches, entries, identity
from swarmtune.batches import Batch, Recorded
from swarmtune.entries import Attestation, Body, Iteration, NoisePlan, Signed

BASE_STATE = bytes(range(32))


class ChainBuilder:
    """Appends correctly sealed entries; tests then break them in targeted ways."""

    def __init__(self, job_id: str = "job-test", workers: int = 3, admitted: int | None = None) -> None:
        self.job_id = job_id
        self.coordinator = identity.generate_key()
        self.workers = [identity.generate_key() for _ in range(workers)]
        initial = self.workers if admitted is None else self.workers[:admitted]
        self.active = list(initial)  # the workers admitted at the head, who evaluate by default
        genesis = entries.new_genesis(
            b'{"task": "countdown", "population": 4}',
            BASE_STATE,
            identity.public_key_bytes(self.coordinator),
            protocol_version=entries.PROTOCOL_VERSION,
            noise_version="noise/1",
            shaping_version="shaping/1",
            tensor_plan=(entries.TensorSpec("lm_head.weight", (8, 4), 20, "dense"),),
            admitted_workers=tuple(identity.public_key_bytes(w) for w in initial),
        )
        self.stored = [entries.seal(self.coordinator, entries.first_entry(job_id, genesis, 1000))]
        self.last_iteration = 0

    @property
    def head(self) -> entries.StoredEntry:
        return entries.parse_entry(self.stored[-1])

    def add(self, body: Body) -> bytes:
        stored = entries.seal(self.coordinator, entries.next_entry(self.head, body, 1000 + len(self.stored)))
        self.stored.append(stored)
        if isinstance(body, Iteration):
            self.last_iteration = body.iteration
        by_key = {identity.public_key_bytes(w): w for w in self.workers}
        if isinstance(body, entries.Admission) and body.worker_key in by_key:
            self.active.append(by_key[body.worker_key])
        if isinstance(body, entries.Revocation):
            self.active = [w for w in self.active if identity.public_key_bytes(w) != body.worker_key]
        return stored

    def key(self, worker: int) -> bytes:
        return identity.public_key_bytes(self.workers[worker])

    def batch(self, worker: Ed25519PrivateKey, iteration: int, members: Sequence[int], head: bytes, rewards: Sequence[float]) -> Batch:
        return batches.sign_batch(worker, self.job_id, iteration, head, members, rewards)

    def iteration(
        self, members: int = 4, workers: Sequence[Ed25519PrivateKey] | None = None, **changes: object
    ) -> Iteration:
        """The next iteration, every member evaluated (member m by worker m mod len(workers), one batch each)."""
        t = self.last_iteration + 1
        head = self.head.hash
        pool = list(workers or self.active)
        rewards = tuple(0.25 * ((t + m) % 5) for m in range(members))
        shares = [list(range(i, members, len(pool))) for i in range(len(pool))]
        recorded = tuple(Recorded(self.batch(w, t, share, head, [rewards[m] for m in share])) for w, share in zip(pool, shares) if share)
        coefficients = tuple(int(1000 * r) - 500 for r in rewards)
        body = Iteration(t, head, NoisePlan(11, members, members % 2 == 0), recorded, coefficients, (), "zscore")
        return replace(body, **changes)  # type: ignore[arg-type]

    def attestation(self, worker: Ed25519PrivateKey, iteration: int, state_hash: bytes) -> Signed[Attestation]:
        record = Attestation(self.job_id, iteration, state_hash, identity.public_key_bytes(worker))
        return entries.sign_record(worker, record)


def sound_chain(iterations: int = 3, job_id: str = "job-test") -> ChainBuilder:
    """A ledger with every entry kind, all of it valid."""
    chain = ChainBuilder(job_id, workers=4, admitted=3)
    chain.add(chain.iteration())
    chain.add(entries.Admission(chain.key(3), "joined", "op-b"))
    for _ in range(iterations - 1):
        chain.add(chain.iteration())
    state = bytes([7]) * 32
    chain.add(chain.attestation(chain.workers[0], chain.last_iteration, state))
    attestations = tuple(chain.attestation(w, chain.last_iteration, state) for w in chain.workers[:2])
    chain.add(entries.Checkpoint(chain.last_iteration, state, attestations, 2))
    chain.add(entries.Revocation(chain.key(1), "key leaked", "op-a"))
    return chain
