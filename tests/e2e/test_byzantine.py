"""Colluding liars on loopback with real processes: one liar, two liars with a referee, two liars without one.

Liars (tests/support/lying_worker.py) join properly and answer every member at once with the same
in-range fabricated reward (1.0), signed correctly: they collude without talking.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtune import assignlog, identity, ledgerfile
from swarmtune.client.audit import audit
from swarmtune.entries import Iteration, Revocation, StoredEntry, parse_entry
from tests.support.cluster import TASK_FILE, WAIT_S, Cluster, Clusters, iterations, key_of
from tests.support.processes import Proc
from tests.support.specs import job_spec

pytestmark = pytest.mark.slow

JOB_S = 90.0


def byzantine_spec(job_id: str, model_dir: Path, spot_check: float = 0.0, iterations: int = 4) -> str:
    return job_spec(
        job_id,
        model=model_dir,
        seed=5,
        iterations=iterations,
        task={"name": f"{TASK_FILE}:TASK", "prompts_per_iteration": 2, "max_new_tokens": 4},
        es={"population": 6, "sigma": 0.05, "alpha": 0.01},
        schedule={"deadline_seconds": 60.0, "redundancy": 2, "revoke_after": 2, "spot_check": spot_check, "attest_every": 1},
    )


def start(cluster: Cluster, liars: int, honest: int, referee: bool) -> tuple[Proc, list[Proc], list[Proc], Proc | None]:
    """Coordinator, `liars` liars and `honest` honest workers (each its own --operator), and a referee."""
    total = liars + honest + referee
    cluster.worker_keys += [cluster.root / f"worker{i}.key" for i in range(len(cluster.worker_keys), total)]
    for path in cluster.worker_keys:
        if not path.exists():
            identity.save_private_key(identity.generate_key(), path)
    extra = ("--referee", str(cluster.worker_keys[total - 1])) if referee else ()
    coordinator = cluster.coordinator("--serve-after", "--min-workers", str(liars + honest), *extra)
    lying = [cluster.worker(i, "--operator", f"liar{i}", liar=True) for i in range(liars)]
    truthful = [cluster.worker(i, "--operator", f"honest{i}") for i in range(liars, liars + honest)]
    judge = cluster.worker(total - 1, "--operator", "referee") if referee else None
    return coordinator, lying, truthful, judge


def exported(cluster: Cluster) -> list[StoredEntry]:
    """The ledger: it verifies, and the audit re-derives every draw, verdict, spot check and strike."""
    path = cluster.export()
    stored = ledgerfile.read(path)
    report = audit(stored)
    assert report.ok, report.problem
    return [parse_entry(entry) for entry in stored]


def revoked_keys(stored: list[StoredEntry]) -> dict[bytes, int]:
    return {e.entry.body.worker_key: e.entry.index for e in stored if isinstance(e.entry.body, Revocation)}


def finish(coordinator: Proc, workers: list[Proc], revoked: set[int]) -> None:
    coordinator.wait_for("job finished", JOB_S)
    for index, worker in enumerate(workers):
        code = worker.wait(WAIT_S)
        assert code == (2 if index in revoked else 0), worker.tail()


def test_one_liar_among_three_honest_is_revoked(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("one-liar", redis_url, byzantine_spec(job_id, model_dir))
    coordinator, lying, truthful, _ = start(cluster, liars=1, honest=3, referee=False)
    finish(coordinator, [*lying, *truthful], revoked={0})
    stored = exported(cluster)
    liar = key_of(cluster.worker_keys[0])
    assert set(revoked_keys(stored)) == {liar}
    for it in iterations(stored):  # shaping only ever used a reward an honest worker measured
        assert all(r.worker_key != liar or r.reward != it.rewards[r.member] for r in it.results)
    assert iterations(stored)[0].candidates and set(iterations(stored)[0].candidates) <= set(map(key_of, cluster.worker_keys))
    assert all(len(it.capacities) == len(it.candidates) for it in iterations(stored))
    # The liar's disputed members got extra opinions, each recorded with its reason (the audit checked them).
    assert any(g.reason == assignlog.DISPUTE for g in later(stored))


def later(stored: list[StoredEntry]) -> list[assignlog.Given]:
    """Every member given to a worker after an opening, as the entries record them."""
    return [g for it in iterations(stored) for g in assignlog.decode(it.candidates, it.others, it.assignments)]


def test_two_colluding_liars_are_revoked_by_a_referee(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("referee", redis_url, byzantine_spec(job_id, model_dir, spot_check=0.5))
    coordinator, lying, truthful, judge = start(cluster, liars=2, honest=3, referee=True)
    assert judge is not None
    finish(coordinator, [*lying, *truthful, judge], revoked={0, 1})
    stored = exported(cluster)
    liars = {key_of(cluster.worker_keys[i]) for i in range(2)}
    revoked = revoked_keys(stored)
    assert set(revoked) == liars, "a liar stayed or an honest worker was revoked"
    referee = key_of(cluster.worker_keys[5])
    assert any(e.entry.body.role == "referee" and e.entry.body.worker_key == referee for e in stored if e.kind == "admission")
    last_revocation = max(revoked.values())
    after = [e.entry.body for e in stored if e.entry.index > last_revocation and isinstance(e.entry.body, Iteration)]
    assert after, "the liars were revoked only at the very end"
    assert all(r.worker_key not in liars for it in after for r in it.results)
    for it in iterations(stored):  # wherever the referee answered, its reward is the one recorded
        for r in it.results:
            if r.worker_key == referee:
                assert it.rewards[r.member] == r.reward
    reasons = [e.entry.body.reason for e in stored if isinstance(e.entry.body, Revocation)]
    assert all("disagreed with a referee" in reason for reason in reasons)
    refereed = [g for g in later(stored) if g.worker == referee]  # the referee takes nothing at an opening
    assert refereed and {g.reason for g in refereed} <= {assignlog.SPOT_CHECK, assignlog.DISPUTE}


def test_without_a_referee_no_honest_majority_is_revoked_and_an_alert_is_raised(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    cluster = clusters("no-referee", redis_url, byzantine_spec(job_id, model_dir))
    coordinator, lying, truthful, _ = start(cluster, liars=2, honest=3, referee=False)
    coordinator.wait_for("job finished", JOB_S)
    stored = exported(cluster)
    revoked = revoked_keys(stored)
    honest = {key_of(cluster.worker_keys[i]) for i in range(2, 5)}
    assert len(honest & set(revoked)) < 2, "a majority of the honest workers was revoked"
    alerts = [alert for it in iterations(stored) for alert in it.alerts]
    assert any("no referee" in alert or "without referees" in alert for alert in alerts), alerts
    assert coordinator.events("alert")
    finish(coordinator, [*lying, *truthful], revoked={i for i in range(5) if key_of(cluster.worker_keys[i]) in revoked})
