"""A coordinator that outlives Redis and its own death: it waits for Redis with backoff, and a standby of
the job takes the lease over when the active coordinator is killed or paused (real processes, loopback)."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from swarmtune import entries
from swarmtune.coordinator.lease import LeaseTimings
from swarmtune.demo.cluster import free_port
from swarmtune.embedded_redis import SOCKET_NAME, EmbeddedRedis
from swarmtune.store import connect
from tests.support.cluster import JOB_TIMEOUT_S, WAIT_S, Cluster, Clusters, spec_text
from tests.support.processes import Proc, parse_events
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

TTL = LeaseTimings(ttl_s=5.0)
SLACK_S = 3.0  # process scheduling on a loaded machine, on top of the documented bound
EXIT_S = 10.0  # a signal ends a wait "promptly"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose socket path fits sockaddr_un, so its Redis URL is known before the server starts."""
    path = Path(tempfile.mkdtemp(prefix="st-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Pair:
    """An active coordinator and its standby, with 2 workers behind a service address (a proxy)."""

    active: Proc
    standby: Proc
    standby_port: int
    service: TcpProxy
    workers: list[Proc]

    def took_over(self, since: float) -> float:
        """Seconds from `since` (wall clock) until the standby held the lease (within the documented
        bound); then, once it listens, the service address follows the health check to it."""
        acquired = self.standby.wait_for("lease acquired", TTL.takeover_bound_s + WAIT_S)
        took = acquired["ts"] - since
        assert 0 < took <= TTL.takeover_bound_s + SLACK_S, (took, self.standby.tail())
        assert acquired["waited_s"] > 0
        self.standby.wait_for("listening", WAIT_S)
        self.service.upstream_port = self.standby_port
        return took


def active_and_standby(cluster: Cluster, opened: int) -> Pair:
    """The active coordinator (on the cluster's port), a standby of the same job on a port of its own once
    the active one holds the lease, and workers through the service address; returns once the active one
    has opened iteration `opened`, the standby serving nothing."""
    ttl = ("--lease-ttl", f"{TTL.ttl_s:g}")
    active = cluster.coordinator("--serve-after", "--min-workers", "2", *ttl)
    active.wait_for("lease acquired", WAIT_S)
    standby_port = free_port()
    standby = cluster.coordinator("--serve-after", *ttl, "--listen", f"127.0.0.1:{standby_port}", name="standby")
    standing = standby.wait_for("standing by", WAIT_S)
    assert standing["holder"].split(":")[2:4] == ["127.0.0.1", str(cluster.port)], standing
    service = cluster.proxy()
    workers = [cluster.worker(i, address=f"127.0.0.1:{service.port}") for i in range(2)]
    active.wait_for("iteration opened", JOB_TIMEOUT_S, lambda e: e["iteration"] >= opened)
    assert not standby.events("listening")
    return Pair(active, standby, standby_port, service, workers)


def check_job(cluster: Cluster, iterations: int) -> list[entries.StoredEntry]:
    """Iterations 1..n once each with every member rewarded, in Redis; and `audit --replay` holds (chain,
    signatures, admissions, coefficients, every attested hash replayed)."""
    with connect(cluster.redis_url) as store:
        stored = [entries.parse_entry(raw) for raw in store.read(cluster.job_id)]
    done = [e.entry.body for e in stored if isinstance(e.entry.body, entries.Iteration)]
    assert [it.iteration for it in done] == list(range(1, iterations + 1))
    assert all({r.member for r in it.results} == {m.member for m in it.members} for it in done)
    [report] = cluster.run(
        "audit", "audit", "--redis-url", cluster.redis_url, "--job", cluster.job_id, "--replay", "--model", str(cluster.model_dir), "--json"
    )
    assert report["ok"] is True and report["iterations"] == iterations and report["entries"] == len(stored), report
    return stored


def test_coordinator_started_before_redis_waits_then_runs_the_job(
    clusters: Clusters, short_dir: Path, model_dir: Path, job_id: str
) -> None:
    url = f"unix://{short_dir / SOCKET_NAME}"
    cluster = clusters("redis-late", url, spec_text(job_id, model_dir, iterations=3, population=4))
    coordinator = cluster.coordinator("--serve-after", "--min-workers", "2")
    coordinator.wait_for("waiting for Redis", WAIT_S, lambda e: e["attempt"] >= 3)
    with EmbeddedRedis(short_dir) as redis_server:
        assert redis_server.url == url
        coordinator.wait_for("listening", WAIT_S)
        workers = [cluster.worker(i) for i in range(2)]
        cluster.finish(coordinator, workers)
        tries = coordinator.events("waiting for Redis")
        delays = [e["next_delay_s"] for e in tries]
        assert [e["attempt"] for e in tries] == list(range(1, len(tries) + 1)), tries
        assert delays[:3] == [0.5, 1.0, 2.0] and all(d <= 30 for d in delays), delays
        assert coordinator.events("Redis reachable")[0]["attempt"] == len(tries) + 1
        check_job(cluster, 3)


def test_redis_wait_gives_up_at_its_limit_and_sigterm_ends_the_wait(clusters: Clusters, model_dir: Path, job_id: str) -> None:
    cluster = clusters("redis-never", "unix:///nonexistent/swarmtune.sock", spec_text(job_id, model_dir, iterations=1))
    limited = cluster.coordinator("--redis-wait", "1", name="limited")
    assert limited.wait(WAIT_S) == 2, limited.tail()
    assert "cannot reach Redis" in limited.text() and "gave up after" in limited.text(), limited.tail()
    waiting = cluster.coordinator(name="waiting")
    waiting.wait_for("waiting for Redis", WAIT_S, lambda e: e["attempt"] >= 2)
    signalled = time.monotonic()
    waiting.send(signal.SIGTERM)
    assert waiting.wait(EXIT_S) == 0, waiting.tail()
    assert time.monotonic() - signalled < EXIT_S
    assert waiting.events("stopping on signal while waiting for Redis"), waiting.tail()


def test_standby_takes_over_when_the_active_coordinator_is_sigkilled(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    cluster = clusters("standby-kill", redis_url, spec_text(job_id, model_dir, iterations=6))
    pair = active_and_standby(cluster, opened=3)
    killed = time.time()
    pair.active.kill()
    took = pair.took_over(killed)
    cluster.finish(pair.standby, pair.workers)
    stored = check_job(cluster, 6)
    for worker in pair.workers:
        assert len(worker.events("joined")) >= 2, worker.tail()  # every worker reconnected
    assert len({e.hash for e in stored}) == len(stored)
    print(f"takeover after SIGKILL: {took:.2f} s (bound {TTL.takeover_bound_s:g} s)")


def test_a_paused_active_coordinator_loses_its_lease_and_stops_without_appending(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    cluster = clusters("standby-pause", redis_url, spec_text(job_id, model_dir, iterations=5))
    pair = active_and_standby(cluster, opened=2)
    active, standby = pair.active, pair.standby
    paused = time.time()
    active.send(signal.SIGSTOP)
    took = pair.took_over(paused)
    pair.service.cut()  # the workers' calls to the frozen coordinator end; they reconnect through the service
    active.send(signal.SIGCONT)
    assert active.wait(WAIT_S) == 2, active.tail()
    [lost] = active.events("lease lost; stopping without writing")
    # Not "no close logged after the standby's lease": a close whose append reached Redis before the pause
    # is logged after SIGCONT. What matters is that no iteration was closed by both (the Redis-side fence,
    # tests/coordinator/test_lease.py, refuses any write once the lease changed hands), and check_job
    # below finds each iteration exactly once in the ledger.
    closed_by_active = {e["iteration"] for e in active.events("iteration closed")}
    cluster.finish(standby, pair.workers)
    assert not closed_by_active & {e["iteration"] for e in standby.events("iteration closed")}, active.tail()
    assert "lost the lease" in active.text() and "restart it to stand by" in active.text(), active.tail()
    check_job(cluster, 5)
    print(f"takeover after SIGSTOP: {took:.2f} s; the old active said: {lost['reason']}")


def test_cli_lease_ttl_too_short_is_refused(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("short-ttl", redis_url, spec_text(job_id, model_dir, iterations=1))
    proc = cluster.coordinator("--lease-ttl", "0.2", name="short")
    assert proc.wait(WAIT_S) == 2 and "--lease-ttl 0.2 is too short" in proc.text(), proc.tail()
    assert not parse_events(proc.text())
