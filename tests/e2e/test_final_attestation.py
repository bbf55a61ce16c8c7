"""The final attestation always lands: the coordinator waits while the workers hash, the workers drain before exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtune.coordinator.server import FINAL_ATTESTATION_GRACE_S
from tests.support.cluster import WAIT_S, Clusters, attestations, key_of, ledger_entries, spec_text
from tests.support.slow_hash_worker import HASH_DELAY_S

pytestmark = pytest.mark.slow

ITERATIONS = 2
WORKERS = 2


def test_every_final_attestation_lands_when_hashing_outlasts_the_grace(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    spec = spec_text(job_id, model_dir, iterations=ITERATIONS).replace("attest_every = 1", f"attest_every = {ITERATIONS}")
    assert f"attest_every = {ITERATIONS}" in spec, spec
    cluster = clusters("final", redis_url, spec)
    # No --serve-after: the coordinator exits once its wait for the final attestations ends.
    coordinator = cluster.coordinator("--min-workers", str(WORKERS))
    workers = [
        cluster.launch(
            f"worker{i}",
            "tests.support.slow_hash_worker",
            ["--coordinator", cluster.address, "--key", str(cluster.worker_keys[i]), "--model", str(model_dir), "--log-json"],
        )
        for i in range(WORKERS)
    ]
    finished = coordinator.wait_for("job finished", WAIT_S * 2)
    deadline_s = HASH_DELAY_S + WAIT_S
    assert coordinator.wait(deadline_s) == 0, coordinator.tail()
    for worker in workers:
        assert worker.wait(deadline_s) == 0, worker.tail()
    for worker in workers:  # the timestamps the processes logged (one clock): attested after the old fixed wait
        [final] = [e for e in worker.events("attested") if e["iteration"] == ITERATIONS] or [None]
        assert final is not None and final["status"] == "ACCEPTED", worker.tail()
        assert final["ts"] - finished["ts"] > FINAL_ATTESTATION_GRACE_S, ("the hashing was not slow: the test proves nothing", final, finished)
    logs = "\n".join(proc.text() for proc in [coordinator, *workers])
    assert "final attestations incomplete" not in coordinator.text(), coordinator.tail()
    assert "unsent_at_exit" not in logs, logs[-4000:]
    attested = {a.worker_key for a in attestations(ledger_entries(cluster.export())) if a.iteration == ITERATIONS}
    assert attested == {key_of(path) for path in cluster.worker_keys[:WORKERS]}, logs[-4000:]
