"""Checkpoint entries: which iteration is ready (pure), the live append on a quorum, and restarts."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import entries, identity, ledger
from swarmtune.coordinator.chain import Chain, recover
from swarmtune.coordinator.checkpoints import due_checkpoint
from swarmtune.coordinator.server import ServerOptions, open_history, start
from swarmtune.entries import Attestation, Checkpoint
from swarmtune.jobspec import parse_job_spec
from swarmtune.store import LedgerStore, connect
from swarmtune.wire import service_pb2 as pb
from tests.support.coordinator_harness import SimWorker, spec_text, with_workers

TIMEOUT_S = 60.0
HASH_A, HASH_B = bytes([1]) * 32, bytes([2]) * 32
SCHEDULE = {"attest_every": 1, "checkpoint_every": 1, "checkpoint_quorum": 2}


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


def signed(key: Ed25519PrivateKey, iteration: int, state_hash: bytes, job_id: str = "job-c") -> bytes:
    record = Attestation(job_id, iteration, state_hash, identity.public_key_bytes(key))
    return entries.encode_signed(entries.sign_record(key, record))


def attested_by(votes: dict[Ed25519PrivateKey, dict[int, bytes]]) -> dict[bytes, dict[int, bytes]]:
    """History.attested for `votes` (worker -> iteration -> state hash)."""
    return {identity.public_key_bytes(k): {t: signed(k, t, h) for t, h in by.items()} for k, by in votes.items()}


def test_a_checkpoint_needs_a_quorum_of_distinct_admitted_workers_on_one_hash() -> None:
    w = [identity.generate_key() for _ in range(4)]
    keys = {identity.public_key_bytes(k) for k in w}
    one = attested_by({w[0]: {4: HASH_A}})
    assert due_checkpoint(one, keys, every=4, quorum=2, iterations=[4], last_checkpoint=0) is None
    two = attested_by({w[0]: {4: HASH_A}, w[1]: {4: HASH_A}, w[2]: {4: HASH_B}})
    found = due_checkpoint(two, keys, every=4, quorum=2, iterations=[4], last_checkpoint=0)
    assert isinstance(found, Checkpoint) and (found.iteration, found.state_hash, found.quorum) == (4, HASH_A, 2)
    assert sorted(a.record.worker_key for a in found.attestations) == sorted(identity.public_key_bytes(k) for k in w[:2])
    # A revoked (no longer admitted) worker's attestation does not count.
    assert due_checkpoint(two, keys - {identity.public_key_bytes(w[1])}, 4, 2, [4], 0) is None
    # A split vote is no checkpoint, whatever the quorum.
    split = attested_by({w[0]: {4: HASH_A}, w[1]: {4: HASH_A}, w[2]: {4: HASH_B}, w[3]: {4: HASH_B}})
    assert due_checkpoint(split, keys, 4, 2, [4], 0) is None


def test_only_multiples_after_the_last_checkpoint_and_the_newest_ready_one() -> None:
    w = [identity.generate_key() for _ in range(2)]
    keys = {identity.public_key_bytes(k) for k in w}
    votes = attested_by({k: {2: HASH_A, 3: HASH_A, 4: HASH_B, 6: HASH_A} for k in w})
    assert due_checkpoint(votes, keys, every=0, quorum=2, iterations=range(1, 7), last_checkpoint=0) is None
    newest = due_checkpoint(votes, keys, every=2, quorum=2, iterations=range(1, 7), last_checkpoint=0)
    assert newest is not None and (newest.iteration, newest.state_hash) == (6, HASH_A)
    assert due_checkpoint(votes, keys, every=2, quorum=2, iterations=[3], last_checkpoint=0) is None
    assert due_checkpoint(votes, keys, every=2, quorum=2, iterations=range(1, 7), last_checkpoint=6) is None
    older = due_checkpoint(votes, keys, every=2, quorum=2, iterations=[2, 4], last_checkpoint=2)
    assert older is not None and older.iteration == 4


async def attest(worker: SimWorker, iteration: int, state_hash: bytes) -> str:
    record = Attestation(worker.job_id, iteration, state_hash, worker.public)
    data = entries.encode_signed(entries.sign_record(worker.key, record))
    reply = await worker.stub.Attest(pb.AttestRequest(session=worker.session, attestation=data))
    return pb.Reason.Name(reply.status.reason)


def kinds(store: LedgerStore, job_id: str) -> list[str]:
    return [entries.parse_entry(s).kind for s in store.read(job_id)]


def checkpoints(store: LedgerStore, job_id: str) -> list[Checkpoint]:
    bodies = [entries.parse_entry(s).entry.body for s in store.read(job_id)]
    return [body for body in bodies if isinstance(body, Checkpoint)]


async def restart(store: LedgerStore, spec_bytes: bytes, key: Ed25519PrivateKey) -> None:
    """A coordinator's new life on the stored ledger, up to its job.start() (which resumes the open iteration)."""
    spec = parse_job_spec(spec_bytes)
    history = open_history(store, spec, key, (), make_genesis=lambda: pytest.fail("the ledger has its genesis"))
    running = await start(spec, store, key, history, (0.0, 1.0), ServerOptions(listen="127.0.0.1:0"))
    try:
        await running.job.start()
    finally:
        running.job.stop("test over")
        await running.server.stop(0)


def test_the_coordinator_appends_a_checkpoint_on_quorum_once_across_restarts(store: LedgerStore, job_id: str) -> None:
    spec_bytes = spec_text(job_id, iterations=3, schedule=SCHEDULE)

    async def scenario() -> tuple[Ed25519PrivateKey, bytes]:
        async with with_workers(store, spec_bytes, 2, auto=False, capacity=3) as (c, workers):
            await c.begin(*workers)
            for worker in workers:
                opened = await worker.until_opened(1)
                await worker.submit([worker.result(opened, m) for m in opened.assigned])
            a, b = workers
            await a.until_opened(2)
            assert await attest(a, 1, HASH_A) == "ACCEPTED"
            assert "checkpoint" not in kinds(store, job_id)  # one attestor, quorum 2
            assert await attest(b, 1, HASH_A) == "ACCEPTED"
            assert [(cp.iteration, cp.state_hash, cp.quorum, len(cp.attestations)) for cp in checkpoints(store, job_id)] == [(1, HASH_A, 2, 2)]
            assert c.job.history.last_checkpoint == 1
            for worker in workers:  # iteration 2 closes; its second attestation is left for the restart
                opened = await worker.until_opened(2)
                await worker.submit([worker.result(opened, m) for m in opened.assigned])
            await a.until_opened(3)
            assert await attest(a, 2, HASH_B) == "ACCEPTED"
            return c.key, signed(b.key, 2, HASH_B, job_id)

    key, b_attests_2 = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
    # The coordinator stopped right after appending an attestation that completes a quorum.
    Chain(store, key, recover(store.read(job_id), identity.public_key_bytes(key), 0.0)).append(
        entries.decode_signed(Attestation, b_attests_2)
    )
    assert [cp.iteration for cp in checkpoints(store, job_id)] == [1]
    asyncio.run(asyncio.wait_for(restart(store, spec_bytes, key), TIMEOUT_S))
    assert [(cp.iteration, cp.state_hash) for cp in checkpoints(store, job_id)] == [(1, HASH_A), (2, HASH_B)]
    asyncio.run(asyncio.wait_for(restart(store, spec_bytes, key), TIMEOUT_S))
    assert [cp.iteration for cp in checkpoints(store, job_id)] == [1, 2]  # not appended twice
    report = ledger.verify_chain(store.read(job_id))
    assert report.ok, report.problem
