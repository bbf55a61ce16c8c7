"""Late joiners: a snapshot at a checkpoint (served over HTTP) means replaying only the tail; a tampered one is
refused and the worker joins by full replay. Real coordinator, workers, Redis, `swarmtune snapshot` and audit."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import pytest

from swarmtune import entries, identity, ledgerfile
from swarmtune.client.audit import audit
from swarmtune.entries import Attestation, Checkpoint
from swarmtune.models import load_model
from tests.support.cluster import WAIT_S, Clusters, key_of, ledger_entries, spec_text
from tests.support.file_server import serving

pytestmark = pytest.mark.slow

ITERATIONS = 6
CHECKPOINTED = 2  # the snapshot's iteration: the first checkpoint


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory and the base URL of a local HTTP server over it."""
    root = tmp_path / "served"
    root.mkdir()
    with serving(root) as url:
        yield root, url


def test_late_joiners_from_a_good_and_a_tampered_snapshot(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str, served: tuple[Path, str]
) -> None:
    schedule = "attest_every = 1\ncheckpoint_every = 2\ncheckpoint_quorum = 2\n"
    spec = spec_text(job_id, model_dir, iterations=ITERATIONS).replace("attest_every = 1\n", schedule)
    assert "checkpoint_every = 2" in spec, spec
    cluster = clusters("late", redis_url, spec)
    coordinator, early, _ = cluster.start(2)
    coordinator.wait_for("checkpoint", WAIT_S, lambda e: e["iteration"] == CHECKPOINTED)
    coordinator.wait_for("iteration closed", WAIT_S, lambda e: e["iteration"] > CHECKPOINTED)
    for worker in early:  # the job now waits for the late joiners
        worker.send(signal.SIGTERM)
    for worker in early:
        assert worker.wait(WAIT_S) == 0, worker.tail()

    root, url = served
    good = root / "snapshot.bin"
    exported = str(cluster.export())
    [written] = cluster.run(
        "snapshot", "snapshot", "--ledger", exported, "--model", str(model_dir),
        "--iteration", str(CHECKPOINTED), "--out", str(good), "--json",
    )  # fmt: skip
    unchecked = cluster.launch("snapshot-1", "swarmtune", ["snapshot", "--ledger", exported, "--iteration", "1", "--out", str(root / "x")])
    assert unchecked.wait(WAIT_S) == 2 and "iteration 1 has no checkpoint entry; checkpointed iterations: [2" in unchecked.text()
    assert written["iteration"] == CHECKPOINTED and written["bytes"] == good.stat().st_size
    tampered = cluster.root / "tampered.bin"
    data = bytearray(good.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))

    late = [cluster.worker(2, "--snapshot", f"{url}/snapshot.bin"), cluster.worker(3, "--snapshot", str(tampered))]
    cluster.finish(coordinator, late)
    from_snapshot, refused = late
    assert from_snapshot.wait_for("snapshot_loaded", WAIT_S)["iteration"] == CHECKPOINTED
    caught = from_snapshot.wait_for("caught_up", WAIT_S)
    assert caught["iteration"] > CHECKPOINTED and caught["iterations_applied"] == caught["iteration"] - CHECKPOINTED, caught
    assert "its checkpoint records" in refused.wait_for("snapshot_refused", WAIT_S)["error"]
    caught = refused.wait_for("caught_up", WAIT_S)
    assert caught["iterations_applied"] == caught["iteration"] > CHECKPOINTED, caught

    # Both attest the replayed hashes (the one that joined first may have finished the job alone).
    stored, replayed, summary = cluster.checked_ledger(late)
    assert summary["iteration"] == ITERATIONS
    checkpoints = [e.entry.body for e in stored if isinstance(e.entry.body, Checkpoint)]
    assert CHECKPOINTED in {cp.iteration for cp in checkpoints}
    assert all(cp.state_hash.hex() == replayed[cp.iteration] for cp in checkpoints)
    [report] = cluster.run("audit", "audit", "--ledger", str(cluster.root / "ledger.bin"), "--model", str(model_dir), "--replay", "--json")
    assert report["ok"] and report["attestations_checked"] >= len(checkpoints) + len(replayed), report
    assert len(ledger_entries(cluster.root / "ledger.bin")) == report["entries"]

    # A checkpoint the replay contradicts (sealed with the coordinator's key, attested by a quorum) is reported.
    final = ledgerfile.read(cluster.root / "ledger.bin")
    forged_hash = bytes(32)
    votes = tuple(
        entries.sign_record(identity.load_private_key(path), Attestation(job_id, ITERATIONS, forged_hash, key_of(path)))
        for path in cluster.worker_keys[2:4]
    )
    head = entries.parse_entry(final[-1])
    forged = entries.next_entry(head, Checkpoint(ITERATIONS, forged_hash, votes, 2), head.entry.timestamp_ms + 1)
    stored_forged = [*final, entries.seal(identity.load_private_key(cluster.coordinator_key), forged)]
    found = audit(stored_forged, load_model(model_dir)[0])
    assert found.problem is not None and (found.problem.index, found.problem.kind) == (len(final), "checkpoint"), found
    assert f"the checkpoint says the state after iteration {ITERATIONS} hashes to {forged_hash.hex()}" in found.problem.message

