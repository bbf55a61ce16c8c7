"""A group-shaped low-rank job (EGGROLL's regime) on a real coordinator, 2 workers and Redis: iterations
close with coefficients shaped within groups, the attested states match the replay, and `audit --replay` holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtune import shaping
from swarmtune.jobspec import parse_job_spec
from tests.support.cluster import TASK_FILE, Clusters, iterations
from tests.support.specs import job_spec

pytestmark = pytest.mark.slow

ITERATIONS = 3


def test_a_group_shaped_job_closes_replays_and_audits(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    text = job_spec(
        job_id,
        model=model_dir,
        seed=13,
        iterations=ITERATIONS,
        task={"name": f"{TASK_FILE}:TASK", "prompts_per_member": 2, "max_new_tokens": 6},
        es={"population": 8, "group_size": 4, "antithetic": True, "sigma": 0.05, "alpha": 0.01, "shaping": "centered_rank"},
        noise={"family": "lowrank", "rank": 1},
        schedule={"deadline_seconds": 60.0, "attest_every": 1},
    )
    spec = parse_job_spec(text.encode())
    cluster = clusters("groups", redis_url, text)
    coordinator, workers, _ = cluster.start(2)
    cluster.finish(coordinator, workers)

    stored, replayed, summary = cluster.checked_ledger(workers)
    assert summary["iteration"] == ITERATIONS and sorted(replayed) == list(range(1, ITERATIONS + 1))
    closed = iterations(stored)
    assert [body.iteration for body in closed] == list(range(1, ITERATIONS + 1))
    for body in closed:
        rewarded = sorted(body.counted[0])
        assert rewarded == list(range(8)), body.counted
        rewards = [body.rewards[m] for m in rewarded]
        grouped = shaping.coefficients(rewards, "centered_rank", spec.alpha, [spec.group_of(m) for m in rewarded])
        assert list(body.coefficients) == grouped
        # Centered ranks within a group of 4 sum to 0 there (up to 4 roundings): each group is normalised on its own.
        assert all(abs(sum(body.coefficients[g : g + 4])) <= 2 for g in (0, 4)), body.coefficients
    [report] = cluster.run("audit", "audit", "--ledger", str(cluster.root / "ledger.bin"), "--model", str(model_dir), "--replay", "--json")
    assert report["ok"] and report["replayed"], report
