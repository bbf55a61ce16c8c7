"""End to end on loopback: real Redis, a coordinator and 3 worker processes train a tiny model; replay agrees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cluster import WAIT_S, Clusters, iterations, key_of, spec_text

pytestmark = pytest.mark.slow


# Low-rank noise on the Linear weights only: workers evaluate their members in one batched generation.
LOWRANK: Table = {"family": "lowrank", "rank": 1, "lowrank_others": "frozen"}


def test_job_completes_and_every_attested_hash_equals_replay(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("e2e", redis_url, spec_text(job_id, model_dir, iterations=5, retention_every=2, noise=LOWRANK))
    coordinator, workers, _ = cluster.start(3)
    cluster.finish(coordinator, workers)
    stored, replayed, summary = cluster.checked_ledger(workers)
    assert summary["iteration"] == 5 and sorted(replayed) == [1, 2, 3, 4, 5]
    done = iterations(stored)
    assert [it.iteration for it in done] == [1, 2, 3, 4, 5]
    assert all(len(it.results) == 6 for it in done)
    assert any(c != 0 for it in done for c in it.coefficients), "rewards never varied: the test proves nothing"
    assert {len(it.retention) for it in done if it.iteration in (1, 3, 5)} == {1}
    assert len({r.worker_key for it in done for r in it.results}) == 3
    assert any(len(e["members"]) > 1 for worker in workers for e in worker.events("evaluated")), "never batched"


def test_the_same_job_twice_gives_the_same_state_even_with_a_worker_killed(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    spec = spec_text(job_id, model_dir, iterations=4)
    finals = []
    for run, database in (("first", 1), ("second", 2)):
        cluster = clusters(run, f"{redis_url}?db={database}", spec)  # the same job id, in separate databases
        coordinator, workers, _ = cluster.start(3)
        survivors = workers
        if run == "second":
            workers[2].wait_for("evaluated", WAIT_S, lambda e: e["iteration"] >= 2)
            workers[2].kill()
            survivors = workers[:2]
        cluster.finish(coordinator, survivors)
        stored, _, summary = cluster.checked_ledger(survivors)
        if run == "second":  # it really died midway: the last iteration went on without it
            assert all(r.worker_key != key_of(cluster.worker_keys[2]) for r in iterations(stored)[-1].results)
        finals.append((summary["state_hash"], [it.coefficients for it in iterations(stored)]))
    assert finals[0] == finals[1]
