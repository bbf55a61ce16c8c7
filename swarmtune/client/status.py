"""Job status for operators: live from the coordinator's Status RPC, or reconstructed from the ledger."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from swarmtune import identity
from swarmtune.client.history import IterationPoint, is_center_reward, iteration_points, job_spec_of
from swarmtune.entries import Admission, Genesis, Iteration, Revocation, StoredEntry
from swarmtune.jobspec import JobSpec

# How many closed iterations a status keeps (the coordinator sends at most 100).
RECENT = 100
CALL_TIMEOUT_S = 10.0
# Ledger entries of a large population are big.
MAX_RECEIVE_BYTES = 64 << 20


class StatusError(Exception):
    """The status cannot be fetched; the message says what to check."""


@dataclass(frozen=True)
class IterationSummary:
    """One closed iteration as the operator sees it; timings are None when unknown (ledger source)."""

    iteration: int
    members: int
    rewarded: int
    reward_mean: float | None
    reward_min: float | None
    reward_max: float | None
    center_reward: float | None  # the center model on the job's own task, when measured
    retention: Mapping[str, float]
    alerts: tuple[str, ...]
    evaluation_s: float | None
    overhead_s: float | None
    wall_s: float | None


@dataclass(frozen=True)
class WorkerSummary:
    """One worker key; what only a live coordinator knows is None when read from the ledger."""

    worker_id: str
    accepted: int
    revoked: bool
    operator_id: str | None = None
    capacity: int | None = None
    connected: bool | None = None
    rejected: int | None = None
    results_per_s: float | None = None
    strikes: int | None = None
    rejects: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class JobStatus:
    """A job at a glance: progress, recent iterations, workers, rejects and alerts."""

    source: str  # "coordinator" (live) or "ledger"
    job_id: str
    state: str  # waiting | running | paused | finished (coordinator); in_progress | finished (ledger)
    iteration: int  # the open iteration, or the last closed one
    iterations_total: int
    closed: int
    population: int
    settled: int | None  # members of the open iteration with a settled reward (live only)
    head_index: int
    head_hash: bytes
    recent: tuple[IterationSummary, ...]
    workers: tuple[WorkerSummary, ...]
    rejects: Mapping[str, int]
    alerts: tuple[str, ...]

    @property
    def progress(self) -> float:
        return self.closed / self.iterations_total if self.iterations_total else 0.0

    @property
    def workers_online(self) -> int | None:
        if any(w.connected is None for w in self.workers):
            return None
        return sum(bool(w.connected) for w in self.workers)

    def to_json(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(self)
        return plain | {"head_hash": self.head_hash.hex(), "progress": self.progress, "workers_online": self.workers_online}


def _plain(value: Any) -> Any:
    """Records, mappings and tuples as dicts and lists, ready for json.dumps."""
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def split_figures(figures: Sequence[tuple[str, float]], job: JobSpec) -> tuple[float | None, Mapping[str, float]]:
    """(the center model's reward on the job's task if measured, the retention figures by name)."""
    center = [value for name, value in figures if is_center_reward(name, job)]
    retention = {name: value for name, value in figures if not is_center_reward(name, job)}
    return (center[0] if center else None), MappingProxyType(retention)


# ---- from the ledger ---------------------------------------------------------------------------


def _summary_of(point: IterationPoint, previous_ms: int, job: JobSpec) -> IterationSummary:
    center, retention = split_figures(point.figures, job)
    return IterationSummary(
        iteration=point.iteration,
        members=point.members,
        rewarded=len(point.rewards),
        reward_mean=point.reward_mean,
        reward_min=point.reward_min,
        reward_max=point.reward_max,
        center_reward=center,
        retention=retention,
        alerts=point.alerts,
        evaluation_s=None,
        overhead_s=None,
        # Entry timestamps (coordinator clock) give wall time between closes, not its split.
        wall_s=(point.timestamp_ms - previous_ms) / 1000,
    )


def _ledger_workers(ledger_entries: Sequence[StoredEntry]) -> tuple[WorkerSummary, ...]:
    accepted: Counter[bytes] = Counter()
    operators: dict[bytes, str] = {}
    revoked: set[bytes] = set()
    for entry in ledger_entries:
        body = entry.entry.body
        if isinstance(body, Genesis):
            accepted.update({key: 0 for key in body.admitted_workers})
        elif isinstance(body, Iteration):
            accepted.update(recorded.batch.worker_key for recorded in body.batches)
        elif isinstance(body, Admission):
            accepted.update({body.worker_key: 0})
            operators[body.worker_key] = body.operator_fingerprint
        elif isinstance(body, Revocation):
            revoked.add(body.worker_key)
    return tuple(
        WorkerSummary(identity.fingerprint(key), count, key in revoked, operators.get(key) or None)
        for key, count in sorted(accepted.items(), key=lambda item: identity.fingerprint(item[0]))
    )


def ledger_status(ledger_entries: Sequence[StoredEntry]) -> JobStatus:
    """What the ledger alone tells (genesis first): progress, rewards, retention, workers' accepted results."""
    job = job_spec_of(list(ledger_entries))
    points = iteration_points(ledger_entries)
    starts = [ledger_entries[0].entry.timestamp_ms, *(p.timestamp_ms for p in points)]
    recent = tuple(_summary_of(p, start, job) for p, start in zip(points[-RECENT:], starts[-RECENT - 1 :]))
    closed = points[-1].iteration if points else 0
    return JobStatus(
        source="ledger",
        job_id=job.job_id,
        state="finished" if closed >= job.iterations else "in_progress",
        iteration=closed,
        iterations_total=job.iterations,
        closed=closed,
        population=job.population,
        settled=None,
        head_index=ledger_entries[-1].entry.index,
        head_hash=ledger_entries[-1].hash,
        recent=recent,
        workers=_ledger_workers(ledger_entries),
        rejects=MappingProxyType({}),
        alerts=tuple(f"iteration {p.iteration}: {alert}" for p in points for alert in p.alerts),
    )


# ---- from a live coordinator -------------------------------------------------------------------


def _summary_message(message: Any, job: JobSpec) -> IterationSummary:
    center, retention = split_figures([(f.name, f.value) for f in message.retention], job)
    rewarded = message.rewarded > 0
    return IterationSummary(
        iteration=message.iteration,
        members=message.members,
        rewarded=message.rewarded,
        reward_mean=message.reward_mean if rewarded else None,
        reward_min=message.reward_min if rewarded else None,
        reward_max=message.reward_max if rewarded else None,
        center_reward=center,
        retention=retention,
        alerts=tuple(message.alerts),
        # Iterations closed before this coordinator process started carry no timing (zeros).
        evaluation_s=message.evaluation_s if message.wall_s else None,
        overhead_s=message.overhead_s if message.wall_s else None,
        wall_s=message.wall_s or None,
    )


# WorkerSummary's fields that the coordinator's WorkerStatus message carries under the same names.
_LIVE_WORKER_FIELDS = ("worker_id", "accepted", "revoked", "operator_id", "capacity", "connected", "rejected", "results_per_s", "strikes")


def _worker_message(message: Any) -> WorkerSummary:
    live = {name: getattr(message, name) for name in _LIVE_WORKER_FIELDS}
    return WorkerSummary(**live, rejects=MappingProxyType(dict(message.rejects)))


def status_from_message(message: Any, job: JobSpec) -> JobStatus:
    """A JobStatus from the coordinator's `JobStatus` reply for `job` (its spec, from genesis)."""
    from swarmtune.wire import service_pb2 as pb

    return JobStatus(
        source="coordinator",
        job_id=message.job_id,
        state=pb.JobStatus.State.Name(message.state).lower(),
        iteration=message.iteration,
        iterations_total=message.iterations_total,
        closed=message.closed,
        population=message.population,
        settled=message.settled,
        head_index=message.head_index,
        head_hash=message.head_hash,
        recent=tuple(_summary_message(m, job) for m in message.recent),
        workers=tuple(_worker_message(w) for w in message.workers),
        rejects=MappingProxyType(dict(message.rejects)),
        alerts=tuple(message.alerts),
    )


def fetch_status(address: str, tls_ca: Path | None = None, timeout_s: float = CALL_TIMEOUT_S) -> JobStatus:
    """The live status of the job a coordinator at HOST:PORT runs (plaintext, or TLS verified by `tls_ca`)."""
    import grpc

    from swarmtune import entries
    from swarmtune.wire import service_pb2 as pb
    from swarmtune.wire.service_pb2_grpc import CoordinatorStub

    options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    try:
        if tls_ca is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options=options)
    except OSError as exc:
        raise StatusError(f"cannot read --tls-ca {tls_ca}: {exc.strerror}; pass the coordinator's CA certificate (PEM)") from None
    with channel:
        stub = CoordinatorStub(channel)
        try:
            message = stub.Status(pb.StatusRequest(), timeout=timeout_s)
            # Genesis names the job's task, which tells the center model's figures from retention probes.
            first = next(iter(stub.FetchLedger(pb.FetchLedgerRequest(from_index=0, to_index=1), timeout=timeout_s)))
        except grpc.RpcError as exc:
            raise StatusError(
                f"no status from the coordinator at {address} ({exc.code().name}: {exc.details()}); "  # type: ignore[attr-defined]
                "check the address, that it runs (with --serve-after once the job ended) and TLS (--tls-ca)"
            ) from None
    return status_from_message(message, job_spec_of([entries.parse_entry(first.stored)]))
