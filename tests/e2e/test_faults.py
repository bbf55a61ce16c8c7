"""Faults on loopback with real processes: killed workers and coordinator, late joiners, cut connections, liars."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from swarmtune import identity
from swarmtune.entries import Iteration, Revocation, StoredEntry
from tests.support.cluster import WAIT_S, Cluster, Clusters, iterations, key_of, spec_text
from tests.support.processes import Proc

pytestmark = pytest.mark.slow


def check_ledger(cluster: Cluster, expected_iterations: int, honest: list[Proc]) -> list[StoredEntry]:
    """The exported ledger verifies, holds iterations 1..n once each with every member rewarded, and
    replays (in a separate process) to every hash the honest workers attested."""
    stored, _, summary = cluster.checked_ledger(honest)
    done = iterations(stored)
    assert [it.iteration for it in done] == list(range(1, expected_iterations + 1))
    assert all({r.member for r in it.results} == {m.member for m in it.members} for it in done)
    assert summary["iteration"] == expected_iterations
    return stored


def test_worker_killed_mid_iteration_has_its_members_reassigned(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("killed", redis_url, spec_text(job_id, model_dir, iterations=5))
    coordinator, workers, _ = cluster.start(3)
    victim = workers[1]
    victim.wait_for("opened", WAIT_S, lambda e: e["iteration"] >= 2)
    # Frozen, it holds members of the open iteration without answering (the others finish theirs and the
    # iteration waits on it, far from its deadline); then it dies with them.
    victim.send(signal.SIGSTOP)
    time.sleep(1.0)  # results it sent before the stop land; the iteration then open is the one it holds
    held = coordinator.events("iteration opened")[-1]["iteration"]
    killed_at = time.time()
    victim.kill()
    victim_id = identity.fingerprint(key_of(cluster.worker_keys[1]))
    coordinator.wait_for("worker disconnected", WAIT_S, lambda e: e["worker"] == victim_id)
    coordinator.wait_for("members re-assigned", WAIT_S, lambda e: e["iteration"] == held and e["ts"] >= killed_at)
    cluster.finish(coordinator, [workers[0], workers[2]])
    stored = check_ledger(cluster, 5, [workers[0], workers[2]])
    victim_key = key_of(cluster.worker_keys[1])
    assert all(r.worker_key != victim_key for it in iterations(stored) if it.iteration > held for r in it.results)


def test_over_tls_sigterm_finishes_the_member_and_exits_zero(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("sigterm", redis_url, spec_text(job_id, model_dir, iterations=4))
    coordinator, workers, _ = cluster.start(2, tls=True)
    workers[0].wait_for("evaluated", WAIT_S, lambda e: e["iteration"] >= 2)
    workers[0].send(signal.SIGTERM)
    assert workers[0].wait(WAIT_S) == 0, workers[0].tail()
    assert workers[0].events("stopping")
    cluster.finish(coordinator, [workers[1]])
    check_ledger(cluster, 4, [workers[1]])


def test_coordinator_sigkilled_and_restarted_resumes_without_loss(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("restart", redis_url, spec_text(job_id, model_dir, iterations=6))
    coordinator, workers, _ = cluster.start(3)
    coordinator.wait_for("iteration opened", WAIT_S, lambda e: e["iteration"] >= 3)
    coordinator.kill()
    restarted = cluster.coordinator("--serve-after", name="restarted")
    restarted.wait_for("listening", WAIT_S)
    cluster.finish(restarted, workers)
    for worker in workers:
        assert len(worker.events("joined")) >= 2, worker.tail()  # every worker reconnected
    stored = check_ledger(cluster, 6, workers)
    assert len({e.hash for e in stored}) == len(stored)


def test_worker_joining_at_iteration_5_catches_up_and_attests_the_same_hash(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    cluster = clusters("late", redis_url, spec_text(job_id, model_dir, iterations=10))
    coordinator, workers, _ = cluster.start(2)
    late_gate = cluster.proxy(gated=True)
    late = cluster.worker(2, address=f"127.0.0.1:{late_gate.port}")
    late.wait_for("ready", WAIT_S)
    coordinator.wait_for("iteration opened", WAIT_S, lambda e: e["iteration"] >= 5)
    late_gate.open_gate()
    caught_up = late.wait_for("caught_up", WAIT_S)
    assert caught_up["iteration"] >= 4
    cluster.finish(coordinator, [*workers, late])
    check_ledger(cluster, 10, [*workers, late])
    assert late.events("attesting") and late.events("evaluated")


def test_dropped_connections_resume(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("drop", redis_url, spec_text(job_id, model_dir, iterations=6))
    coordinator, workers, proxy = cluster.start(3)
    coordinator.wait_for("iteration opened", WAIT_S, lambda e: e["iteration"] >= 3)
    assert proxy.cut() >= 3
    cluster.finish(coordinator, workers)
    for worker in workers:
        assert worker.events("disconnected") and len(worker.events("joined")) >= 2, worker.tail()
    check_ledger(cluster, 6, workers)


def test_fabricated_rewards_are_detected_revoked_and_stop_counting(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    cluster = clusters("liar", redis_url, spec_text(job_id, model_dir, iterations=6, redundancy=2))
    coordinator, workers, _ = cluster.start(3, liars=(2,))
    liar, honest = workers[2], workers[:2]
    cluster.finish(coordinator, honest)
    assert liar.wait(WAIT_S) == 2 and "revoked" in liar.text()  # it learns of its revocation and stops
    stored = check_ledger(cluster, 6, honest)
    liar_key = key_of(cluster.worker_keys[2])
    revoked_at = next(e.entry.index for e in stored if isinstance(e.entry.body, Revocation) and e.entry.body.worker_key == liar_key)
    after = [e.entry.body for e in stored if e.entry.index > revoked_at and isinstance(e.entry.body, Iteration)]
    assert after, "the liar was revoked only at the very end: nothing shows its results stop counting"
    assert all(r.worker_key != liar_key for it in after for r in it.results)
    for it in iterations(stored):  # shaping only ever used a reward an honest worker measured
        honest_rewards = {(r.member, r.reward) for r in it.results if r.worker_key != liar_key}
        assert all((m.member, reward) in honest_rewards for m, reward in zip(it.members, it.rewards)), it.iteration
