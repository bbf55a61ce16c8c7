"""Replay: the base model and the ledger's entries give the exact master state after any iteration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from swarmtune.entries import Genesis, Iteration, StoredEntry, TensorSpec
from swarmtune.jobspec import JobSpec, parse_job_spec
from swarmtune.noise import NoiseConfig
from swarmtune.noisecache import NoiseCache
from swarmtune.spillfile import SpillFile
from swarmtune.state import MasterState, master_from_model, state_hash
from swarmtune.update import IterationUpdate, apply_iteration_, decay_integer

# on_iteration(replica, target iteration): called after every applied iteration (progress bars,
# per-iteration hashes to compare with attestations).
OnIteration = Callable[["Replica", int], None]


class ReplayError(Exception):
    """The ledger cannot be replayed from this base model; the message says what to do."""


@dataclass(frozen=True)
class ReplayParams:
    """What replay takes from genesis: the noise family and the integer anchored-decay strength."""

    noise: NoiseConfig
    decay: int


def genesis_spec(genesis: Genesis) -> JobSpec:
    """The job spec recorded in genesis (its exact bytes)."""
    return parse_job_spec(genesis.job_spec)


def replay_params(spec: JobSpec) -> ReplayParams:
    return ReplayParams(spec.noise, decay_integer(spec.anchored_decay))


def genesis_plan(state: MasterState) -> tuple[TensorSpec, ...]:
    """The tensor plan genesis records for a base state (what replay checks a model against)."""
    return state.specs


def _plan_mismatch(found: Sequence[TensorSpec], recorded: Sequence[TensorSpec]) -> str | None:
    """How the model's tensors differ from the genesis plan (None if they match)."""
    found_names = [s.name for s in found]
    recorded_names = [s.name for s in recorded]
    if found_names != recorded_names:
        missing = sorted(set(recorded_names) - set(found_names))
        extra = sorted(set(found_names) - set(recorded_names))
        return f"its tensors differ from the genesis plan (missing {missing[:3]}, unexpected {extra[:3]})"
    for mine, theirs in zip(found, recorded):
        if mine.shape != theirs.shape:
            return f"tensor {mine.name} has shape {mine.shape}, genesis records {theirs.shape}"
        if mine.exponent != theirs.exponent:
            return f"tensor {mine.name} has exponent {mine.exponent}, genesis records {theirs.exponent} (other weights)"
    return None


def base_state(model: nn.Module, genesis: Genesis) -> MasterState:
    """The genesis master state of `model` under the genesis tensor plan, checked against its hash."""
    plan = genesis_treatments(genesis)
    try:
        state = master_from_model(model, plan)
    except KeyError as exc:
        raise ReplayError(f"the model has tensor {exc.args[0]} that genesis does not plan: pass the job's base model") from None
    return checked_base(state, genesis)


def checked_base(state: MasterState, genesis: Genesis) -> MasterState:
    """`state`, once its plan and hash are the genesis ones (ReplayError saying what differs otherwise)."""
    mismatch = _plan_mismatch(state.specs, genesis.tensor_plan)
    if mismatch:
        raise ReplayError(f"this is not the job's base model: {mismatch}")
    found = state_hash(state)
    if found != genesis.base_state_hash:
        raise ReplayError(
            f"the base model's state hashes to {found.hex()}, genesis records {genesis.base_state_hash.hex()}: "
            "pass the exact base model the job started from (same weights and dtype)"
        )
    return state


def iteration_update(iteration: Iteration) -> IterationUpdate:
    """The members and integer coefficients of an iteration: all replay reads of it. An entry records
    no coefficients (PROTOCOL §3): the verified walk (ledger.walk) derives them from its rewards."""
    if len(iteration.coefficients) != iteration.plan.population:
        raise ReplayError(
            f"iteration {iteration.iteration} has {len(iteration.coefficients)} coefficients for {iteration.plan.population} members: "
            "read its entry through ledger.walk, which derives them from the rewards and the genesis job spec"
        )
    return IterationUpdate(iteration.members, iteration.coefficients)


def spilled_base(state: MasterState) -> SpillFile:
    """The genesis Q anchored decay reads, in a spill file: every resident tensor's (a spilled one is
    frozen, so no update reads its base)."""
    spill = SpillFile()
    for index in range(len(state.specs)):
        if not state.spilled(index):
            spill.write(index, (run for _, run in state.runs(index)))
    return spill


class Replica:
    """One site's copy of a job's model: the current state (host memory, updated in place; frozen
    tensors spilled to disk), the last iteration applied, and the base state only where anchored decay
    needs it (spilled to disk too)."""

    def __init__(self, params: ReplayParams, base: MasterState, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.base = spilled_base(base) if params.decay else None
        self.state = base  # taken over: apply updates it in place
        self.device = torch.device(device)  # where the update computes its chunks
        self.iteration = 0

    def apply(self, iteration: Iteration, cache: NoiseCache | None = None) -> None:
        """Apply the next iteration exactly (in place); `cache` may hold noise drawn for its members."""
        if iteration.iteration != self.iteration + 1:
            raise ReplayError(f"iteration {iteration.iteration} cannot follow iteration {self.iteration}; replay in ledger order")
        update = iteration_update(iteration)
        apply_iteration_(self.state, update, self.params.noise, self.base, self.params.decay, cache, self.device)
        self.iteration = iteration.iteration

    def restore(self, iteration: int) -> None:
        """Declare that `state` now holds the state after `iteration` (a snapshot loader wrote its resident
        tensors in place; frozen ones never change); the next apply must be iteration + 1."""
        if iteration < 0:
            raise ReplayError(f"cannot restore to iteration {iteration}; iterations count from 0")
        self.iteration = iteration

    def state_hash(self) -> bytes:
        return state_hash(self.state)


def replica_from_genesis(model: nn.Module, genesis: Genesis, device: torch.device | str = "cpu") -> Replica:
    """A replica at iteration 0: the checked base state of `model` (on the host, whatever `device`:
    updates compute there chunk by chunk), the parameters from the job spec."""
    return Replica(replay_params(genesis_spec(genesis)), base_state(model, genesis), device)


@dataclass(frozen=True)
class ReplayResult:
    """Where replay stopped: the replica, the entries consumed and the hash of the last one."""

    replica: Replica
    entries: int  # consumed, genesis included
    head_hash: bytes  # of the last entry consumed: the ledger prefix the state follows from

    @property
    def iteration(self) -> int:
        return self.replica.iteration

    @property
    def state_hash(self) -> bytes:
        return self.replica.state_hash()


def replay(
    model: nn.Module,
    ledger_entries: Sequence[StoredEntry],
    until: int | None = None,
    on_iteration: OnIteration | None = None,
    device: torch.device | str = "cpu",
) -> ReplayResult:
    """Replay entries (genesis first) up to iteration `until` (None: all) from the base `model`.

    Entries are taken as given: verify them first (`ledger.walk`, or an audit).
    """
    if not ledger_entries or not isinstance(ledger_entries[0].entry.body, Genesis):
        raise ReplayError("the ledger does not start with a genesis entry; pass the whole ledger")
    return replay_replica(replica_from_genesis(model, ledger_entries[0].entry.body, device), ledger_entries, until, on_iteration)


def replay_replica(
    replica: Replica,
    ledger_entries: Sequence[StoredEntry],
    until: int | None = None,
    on_iteration: OnIteration | None = None,
) -> ReplayResult:
    """replay() from a replica at iteration 0 of the ledger's genesis (built from a model or its files)."""
    iterations = [e.entry.body for e in ledger_entries if isinstance(e.entry.body, Iteration)]
    last = iterations[-1].iteration if iterations else 0
    target = last if until is None else until
    if not 0 <= target <= last:
        raise ReplayError(f"--until {target} is beyond the ledger's last iteration {last}")
    consumed, head = 1, ledger_entries[0].hash
    for entry in ledger_entries[1:]:
        if replica.iteration == target:
            break
        body = entry.entry.body
        if isinstance(body, Iteration):
            replica.apply(body)
            if on_iteration:
                on_iteration(replica, target)
        consumed, head = consumed + 1, entry.hash
    return ReplayResult(replica, consumed, head)


def replica_from_files(directory: Path, genesis: Genesis) -> Replica:
    """replica_from_genesis from a model directory's files: the base state read tensor by tensor from its
    safetensors files (no model loaded; others are loaded), checked against genesis as base_state checks."""
    from swarmtune.statefiles import StateFileError, master_from_files

    try:
        state = master_from_files(directory, genesis_treatments(genesis))
    except StateFileError as exc:
        raise ReplayError(f"{exc}: pass the job's base model") from None
    return Replica(replay_params(genesis_spec(genesis)), checked_base(state, genesis))


def genesis_treatments(genesis: Genesis) -> dict[str, str]:
    """Canonical tensor name -> treatment, from the tensor plan genesis records."""
    if not genesis.tensor_plan:
        raise ReplayError("genesis records no tensor plan; this ledger was written without one and cannot be replayed")
    return {spec.name: spec.treatment for spec in genesis.tensor_plan}
