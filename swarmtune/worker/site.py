"""A worker's verified copy of its job: chain state, exact replica, and the backend's center model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from swarmtune import ledger
from swarmtune.backends.base import Backend, BackendFactory
from swarmtune.entries import Genesis, StoredEntry
from swarmtune.follower import LedgerFollower
from swarmtune.jobspec import JobSpec
from swarmtune.models import load_model, resolve_model
from swarmtune.noisecache import NoiseCache
from swarmtune.replay import Replica, genesis_spec, replica_from_genesis
from swarmtune.tasks.base import Task
from swarmtune.tasks.registry import load_task
from swarmtune.worker.config import WorkerConfig


@dataclass(frozen=True)
class LoadedModel:
    """A base model and its tokenizer, loaded before the job is known (with `--model`)."""

    model: Any
    tokenizer: Any


def load_base_model(model: str, device: str) -> LoadedModel:
    return LoadedModel(*load_model(resolve_model(model), device=device))


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
    ) -> None:
        # The cache is the backend's too: members' noise it drew, drawn again by the update. The
        # verifier checks other workers' result signatures on every core, one live entry at a time.
        super().__init__(chain, replica, noise_cache, verifier)
        self.job = job
        self._backend = backend
        self._center_iteration = 0  # the backend was built on the base state

    def advance(self, stored: bytes, vouched: ledger.Vouched = ()) -> StoredEntry:
        """`accept` a live entry and hand the new center to the backend: the next iteration evaluates on it."""
        entry = self.accept(stored, vouched)
        self.backend()
        return entry

    def backend(self) -> Backend:
        """The backend with the replica's current state as its center (derived lazily: once per catch-up)."""
        if self._center_iteration != self.replica.iteration:
            self._backend.set_center(self.replica.state)
            self._center_iteration = self.replica.iteration
        return self._backend


def open_site(
    stored_genesis: bytes, config: WorkerConfig, make_backend: BackendFactory, loaded: LoadedModel | None, verifier: ThreadPoolExecutor
) -> Site:
    """Verify genesis, load the base model (unless `loaded` already holds `config.model`), check its
    state hash against genesis, load the tasks."""
    chain, entry = ledger.start(stored_genesis)
    genesis = cast(Genesis, entry.entry.body)  # ledger.start only accepts a genesis
    spec = genesis_spec(genesis)
    base = loaded or load_base_model(spec.model, config.device)
    replica = replica_from_genesis(base.model, genesis, config.device)
    task = load_task(spec.task, tokenizer=base.tokenizer, **spec.task_options)
    retention = load_task(spec.retention_task, tokenizer=base.tokenizer, **spec.retention_options) if spec.retention_task else None
    job = JoinedJob(spec, entry.hash, task, retention)
    cache = NoiseCache(config.noise_cache_mb << 20)
    return Site(job, chain, replica, make_backend(base.model, base.tokenizer, replica.base, spec, config.device, cache), cache, verifier)
