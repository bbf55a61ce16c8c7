"""A late joiner's snapshot is trusted only through a verified ledger prefix: a checkpoint entry that the
coordinator did not seal (a forged prefix, with a snapshot made to match it) is refused, and the worker
starts from genesis; the genuine prefix and snapshot restore the checkpointed state (frozen tensors
still spilled, and checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import entries, identity, ledger
from swarmtune.entries import Attestation, Checkpoint, Genesis
from swarmtune.replay import replay_replica, replica_from_genesis
from swarmtune.snapshot import SnapshotHeader, write_snapshot
from swarmtune.state import MasterState, build_plan, master_from_model, state_hash
from swarmtune.worker.config import WorkerConfig
from swarmtune.worker.site import restored_replica
from tests.support import replay_ledger
from tests.support.replay_ledger import build_ledger
from tests.support.tiny_models import tiny_llama

JOB = "replay-test"
CHECKPOINTED = 2


def checkpointed(stored: list[bytes], sealer: Ed25519PrivateKey, worker: Ed25519PrivateKey, at: bytes) -> list[bytes]:
    """`stored` and a checkpoint of iteration 2 at state hash `at`, attested by `worker`, sealed by `sealer`."""
    head = entries.parse_entry(stored[-1])
    vote = entries.sign_record(worker, Attestation(JOB, CHECKPOINTED, at, identity.public_key_bytes(worker)))
    body = Checkpoint(CHECKPOINTED, at, (vote,), 1)
    return [*stored, entries.seal(sealer, entries.next_entry(head, body, head.entry.timestamp_ms + 1))]


def snapshot_file(path: Path, prefix: list[bytes], state: MasterState) -> str:
    with path.open("wb") as out:
        write_snapshot(out, SnapshotHeader(JOB, CHECKPOINTED, entries.entry_hash(prefix[-1])), state)
    return str(path)


def test_a_forged_checkpoint_prefix_is_refused_and_the_genuine_one_restores(tmp_path: Path) -> None:
    model = tiny_llama(seed=3)
    coordinator, worker, forger = identity.generate_key(), identity.generate_key(), identity.generate_key()
    stored = build_ledger(model, iterations=CHECKPOINTED, coordinator=coordinator, worker=worker)
    genesis = entries.parse_entry(stored[0]).entry.body
    assert isinstance(genesis, Genesis)
    replayed = replay_replica(replica_from_genesis(model, genesis), [entry for _, entry in ledger.walk(stored)]).replica
    genuine = checkpointed(stored, coordinator, worker, replayed.state_hash())

    # The forger's state (genesis, i.e. the training undone) with a checkpoint that names its hash.
    forged_state = replica_from_genesis(model, genesis).state
    forged = checkpointed(stored, forger, worker, state_hash(forged_state))
    config = WorkerConfig("127.0.0.1:1", tmp_path / "worker.key", snapshot=snapshot_file(tmp_path / "forged.bin", forged, forged_state))
    replica, refused = restored_replica(model, genesis, JOB, config, forged)
    assert refused is not None and "signature" in refused, refused
    assert replica.iteration == 0 and replica.state_hash() == state_hash(forged_state)

    config = WorkerConfig("127.0.0.1:1", tmp_path / "worker.key", snapshot=snapshot_file(tmp_path / "good.bin", genuine, replayed.state))
    replica, refused = restored_replica(model, genesis, JOB, config, genuine)
    assert refused is None
    assert replica.iteration == CHECKPOINTED and replica.state_hash() == replayed.state_hash()


def test_a_late_joiner_keeps_frozen_tensors_spilled_and_checks_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A low-rank job with frozen others: the restored replica's frozen tensors stay in their spill (the
    snapshot's bytes for them are hashed and compared, not kept), and it goes on exactly; a snapshot whose
    frozen tensor differs is refused even under a sealed checkpoint naming its hash."""
    monkeypatch.setattr(replay_ledger, "SPEC", replay_ledger.SPEC.replace(b'lowrank_others = "dense"', b'lowrank_others = "frozen"'))
    monkeypatch.setattr(replay_ledger, "base_of", lambda model: master_from_model(model, build_plan(model, "lowrank", "frozen")))
    model = tiny_llama(seed=3)
    coordinator, worker = identity.generate_key(), identity.generate_key()
    stored = build_ledger(model, iterations=CHECKPOINTED + 1, coordinator=coordinator, worker=worker)
    verified = [entry for _, entry in ledger.walk(stored)]
    genesis = verified[0].entry.body
    assert isinstance(genesis, Genesis)
    replayed = replay_replica(replica_from_genesis(model, genesis), verified, until=CHECKPOINTED).replica
    frozen = [index for index, spec in enumerate(replayed.state.specs) if spec.treatment == "frozen"]
    assert frozen and all(replayed.state.spilled(index) for index in frozen)
    genuine = checkpointed(stored[: CHECKPOINTED + 1], coordinator, worker, replayed.state_hash())
    config = WorkerConfig("127.0.0.1:1", tmp_path / "worker.key", snapshot=snapshot_file(tmp_path / "good.bin", genuine, replayed.state))
    replica, refused = restored_replica(model, genesis, JOB, config, genuine)
    assert refused is None and replica.iteration == CHECKPOINTED and replica.state_hash() == replayed.state_hash()
    assert all(replica.state.spilled(index) for index in frozen)
    replica.apply(verified[CHECKPOINTED + 1].entry.body)  # type: ignore[arg-type]
    assert replica.state_hash() == replay_replica(replica_from_genesis(model, genesis), verified).state_hash

    moved = MasterState(replayed.state.specs, tuple(replayed.state.whole(index).clone() for index in range(len(replayed.state.specs))))
    moved.q[frozen[0]].view(-1)[0] += 1
    sealed = checkpointed(stored[: CHECKPOINTED + 1], coordinator, worker, state_hash(moved))
    config = WorkerConfig("127.0.0.1:1", tmp_path / "worker.key", snapshot=snapshot_file(tmp_path / "moved.bin", sealed, moved))
    replica, refused = restored_replica(model, genesis, JOB, config, sealed)
    assert refused is not None and "frozen tensor" in refused, refused
    assert replica.iteration == 0 and replica.state_hash() == genesis.base_state_hash
