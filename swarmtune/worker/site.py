"""A worker's verified copy of its job: chain state, exact replica, and the backend's center model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence, cast

from swarmtune import ledger
from swarmtune.backends.base import Backend, BackendFactory
from swarmtune.entries import Genesis, StoredEntry
from swarmtune.digest import Digest
from swarmtune.follower import LedgerFollower
from swarmtune.jobspec import JobSpec
from swarmtune.models import drop_tokenizer_sources, load_model, resolve_model
from swarmtune.noisecache import NoiseCache
from swarmtune.replay import Replica, genesis_spec, replica_from_genesis
from swarmtune.snapshot import SnapshotError, restore_from
from swarmtune.tasks.base import Task
from swarmtune.tasks.registry import load_task
from swarmtune.worker.config import WorkerConfig


@dataclass(frozen=True)
class LoadedModel:
    """A base model and its tokenizer, loaded before the job is known (with `--model`)."""

    model: Any
    tokenizer: Any


def load_base_model(model: str, device: str) -> LoadedModel:
    """The job's model and tokenizer, the tokenizer without the sources it was built from (never saved here)."""
    loaded = LoadedModel(*load_model(resolve_model(model), device=device))
    drop_tokenizer_sources(loaded.tokenizer)
    return loaded


@dataclass(frozen=True)
class JoinedJob:
    """What a worker derives once from genesis: the spec, its tasks, and the genesis it joined."""

    spec: JobSpec
    genesis_hash: bytes
    task: Task
    retention: Task | None


class Site(LedgerFollower):
    """The worker's follower of its job, with the backend that evaluates members on the replica's center."""

    def __init__(
        self,
        job: JoinedJob,
        chain: ledger.ChainState,
        replica: Replica,
        backend: Backend,
        noise_cache: NoiseCache,
        verifier: ThreadPoolExecutor,
        snapshot_refused: str | None = None,
    ) -> None:
        # The cache is the backend's too: members' noise it drew, drawn again by the update. The
        # verifier checks other workers' result signatures on every core, one live entry at a time.
        super().__init__(chain, replica, noise_cache, verifier)
        self.job = job
        self.snapshot_refused = snapshot_refused  # why --snapshot was not used (the replica starts at genesis)
        self._backend = backend
        self._center_iteration = 0  # the backend was built on the base state

    def advance(self, stored: bytes, vouched: ledger.Vouched = ()) -> StoredEntry:
        """`accept` a live entry and hand the new center to the backend: the next iteration evaluates on it."""
        entry = self.accept(stored, vouched)
        self.backend()
        return entry

    def advance_digest(self, data: bytes) -> Digest:
        """`accept_digest` a live iteration digest and hand the new center to the backend."""
        digest = self.accept_digest(data)
        self.backend()
        return digest

    def backend(self) -> Backend:
        """The backend with the replica's current state as its center (derived lazily: once per catch-up)."""
        if self._center_iteration != self.replica.iteration:
            self._backend.set_center(self.replica.state)
            self._center_iteration = self.replica.iteration
        return self._backend


def default_cache_mb(spec: JobSpec) -> int:
    """The noise cache a job gets unless --noise-cache-mb says otherwise: low-rank factors are ~1 MB
    per seed even at 0.5B parameters, but dense noise is as large as the tensors it perturbs (a cache
    that holds it would break the worker's memory bound, and at scale not even one seed fits)."""
    return 256 if spec.noise_family == "lowrank" and spec.lowrank_others == "frozen" else 0


def open_site(
    stored_genesis: bytes,
    config: WorkerConfig,
    make_backend: BackendFactory,
    loaded: LoadedModel | None,
    verifier: ThreadPoolExecutor,
    ledger_so_far: Sequence[bytes] = (),
) -> Site:
    """Verify genesis, load the base model (unless `loaded` already holds `config.model`), check its
    state hash against genesis (or restore `config.snapshot`, named by a checkpoint of `ledger_so_far`),
    load the tasks."""
    chain, entry = ledger.start(stored_genesis)
    genesis = cast(Genesis, entry.entry.body)  # ledger.start only accepts a genesis
    spec = genesis_spec(genesis)
    base = loaded or load_base_model(spec.model, config.device)
    replica, refused = restored_replica(base.model, genesis, entry.entry.job_id, config, ledger_so_far)
    task = load_task(spec.task, tokenizer=base.tokenizer, **spec.task_options)
    retention = load_task(spec.retention_task, tokenizer=base.tokenizer, **spec.retention_options) if spec.retention_task else None
    job = JoinedJob(spec, entry.hash, task, retention)
    cache_mb = config.noise_cache_mb if config.noise_cache_mb is not None else default_cache_mb(spec)
    cache = NoiseCache(cache_mb << 20)
    backend = make_backend(base.model, base.tokenizer, replica.state, spec, config.device, cache)
    return Site(job, chain, replica, backend, cache, verifier, refused)


def restored_replica(
    model: Any, genesis: Genesis, job_id: str, config: WorkerConfig, ledger_so_far: Sequence[bytes]
) -> tuple[Replica, str | None]:
    """The replica at genesis, or at the checkpoint `config.snapshot` holds (loaded into its state in
    place, checked against `ledger_so_far`): the replica, and why the snapshot was refused if it was.
    Runs before the backend writes into the model: a refused snapshot's replica is rebuilt from it."""
    replica = replica_from_genesis(model, genesis, config.device)
    if config.snapshot is None:
        return replica, None
    try:
        # The checkpoint a snapshot is checked against comes from the coordinator: verify the chain up
        # to it before trusting its hash (the follower verifies it again while it catches up).
        ledger_entries = [entry for _, entry in ledger.walk(ledger_so_far)]
        replica.restore(restore_from(config.snapshot, job_id, ledger_entries, replica.state))
        return replica, None
    except (SnapshotError, ledger.LedgerError) as exc:
        refused = str(exc)
    # Rebuilt after the handler: its traceback's frames hold the half-overwritten state until it ends,
    # and one state in memory at a time is the point.
    del replica
    return replica_from_genesis(model, genesis, config.device), refused
