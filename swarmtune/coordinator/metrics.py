"""Prometheus metrics of one coordinator, in a registry of its own (served by --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from swarmtune.coordinator.figures import IterationFigures
from swarmtune.coordinator.status import CloseTiming

CLOSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The coordinator's instruments; `serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.iteration = Gauge("swarmtune_iteration", "Open iteration, or the last closed one", registry=r)
        self.iterations_closed = Counter("swarmtune_iterations_closed", "Iterations closed by this process", registry=r)
        self.reward_mean = Gauge("swarmtune_reward_mean", "Mean settled reward of the last closed iteration", registry=r)
        self.reward_max = Gauge("swarmtune_reward_max", "Max settled reward of the last closed iteration", registry=r)
        self.retention = Gauge("swarmtune_retention", "Last retention figure", ["figure"], registry=r)
        self.workers_connected = Gauge("swarmtune_workers_connected", "Workers subscribed now", registry=r)
        self.results_accepted = Counter("swarmtune_results_accepted", "Signed results accepted", registry=r)
        self.rejects = Counter("swarmtune_rejects", "Submitted items rejected, by reason", ["reason"], registry=r)
        self.revocations = Counter("swarmtune_revocations", "Worker keys revoked for disagreeing", registry=r)
        self.alerts = Counter("swarmtune_alerts", "Alerts recorded in iteration entries (retention, disputes, withheld revocations)", registry=r)
        self.close_seconds = Histogram(
            "swarmtune_close_seconds", "Last needed result -> iteration entry appended", buckets=CLOSE_BUCKETS, registry=r
        )
        self.evaluation_seconds = Gauge("swarmtune_evaluation_seconds", "Opened -> last needed result, last iteration", registry=r)

    def observe_close(self, figures: IterationFigures, timing: CloseTiming) -> None:
        self.iterations_closed.inc()
        self.close_seconds.observe(timing.overhead_s)
        self.evaluation_seconds.set(timing.evaluation_s)
        if figures.rewarded:
            self.reward_mean.set(sum(figures.rewarded) / len(figures.rewarded))
            self.reward_max.set(max(figures.rewarded))
        for name, value in figures.retention:
            self.retention.labels(figure=name).set(value)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
