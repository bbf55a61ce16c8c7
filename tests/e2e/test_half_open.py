"""A half-open network on loopback: a proxy stops forwarding without closing; workers notice within the keepalive bound."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarmtune.worker.session import HALF_OPEN_BOUND_S
from tests.support.cluster import WAIT_S, Clusters, iterations, spec_text

pytestmark = pytest.mark.slow

# Beyond the bound: the worker writing its log line and this test reading it on a shared machine.
LOG_SLACK_S = 3.0
# After noticing: a jittered backoff of at most 0.2 s, then catching up, joining and subscribing anew.
RESUME_S = 10.0


def test_stalled_links_are_noticed_within_the_bound_and_work_resumes(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("stall", redis_url, spec_text(job_id, model_dir, iterations=10))
    coordinator, workers, proxy = cluster.start(2)
    coordinator.wait_for("iteration opened", WAIT_S, lambda e: e["iteration"] >= 2)
    stalled_wall, stalled_at = time.time(), time.monotonic()
    # Like a NAT that lost its mappings: nothing moves on the workers' connections, nothing closes them.
    assert proxy.stall() >= 2
    assert not coordinator.events("job finished"), "the job ended before the link stalled: give it more iterations"
    stalled_in = coordinator.events("iteration opened")[-1]["iteration"]
    noticed_by, resumed_by = stalled_at + HALF_OPEN_BOUND_S + LOG_SLACK_S, stalled_at + HALF_OPEN_BOUND_S + LOG_SLACK_S + RESUME_S
    for worker in workers:
        disconnected = worker.wait_for("disconnected", max(0.0, noticed_by - time.monotonic()), lambda e: e["ts"] >= stalled_wall)
        noticed_s = time.monotonic() - stalled_at
        assert noticed_s <= HALF_OPEN_BOUND_S + LOG_SLACK_S, (worker.name, noticed_s, worker.tail())
        # Reconnected through the proxy (new connections are forwarded), joined again, and working.
        worker.wait_for("joined", max(0.0, resumed_by - time.monotonic()), lambda e: e["ts"] >= disconnected["ts"])
    cluster.finish(coordinator, workers)
    for worker in workers:
        assert any(e["iteration"] >= stalled_in for e in worker.events("evaluated") if e["ts"] >= stalled_wall), worker.tail()
    stored, _, summary = cluster.checked_ledger(workers)
    assert [it.iteration for it in iterations(stored)] == list(range(1, 11)) and summary["iteration"] == 10
