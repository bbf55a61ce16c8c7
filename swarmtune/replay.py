"""Replay: the base model and the ledger's entries give the exact master state after any iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from swarmtune.entries import Genesis, Iteration, StoredEntry, TensorSpec
from swarmtune.jobspec import JobSpec, parse_job_spec
from swarmtune.noise import NoiseConfig
from swarmtune.noisecache import NoiseCache
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
    if not genesis.tensor_plan:
        raise ReplayError("genesis records no tensor plan; this ledger was written without one and cannot be replayed")
    plan = {spec.name: spec.treatment for spec in genesis.tensor_plan}
    try:
        state = master_from_model(model, plan)
    except KeyError as exc:
        raise ReplayError(f"the model has tensor {exc.args[0]} that genesis does not plan: pass the job's base model") from None
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
    """The members and integer coefficients an iteration entry records: all replay reads of it."""
    return IterationUpdate(iteration.members, iteration.coefficients)


class Replica:
    """One site's copy of a job's model: the base state, the current state and the last iteration applied."""

    def __init__(self, params: ReplayParams, base: MasterState) -> None:
        self.params = params
        self.base = base
        self.state = base.clone()
        self.iteration = 0

    def apply(self, iteration: Iteration, cache: NoiseCache | None = None) -> None:
        """Apply the next iteration exactly (in place); `cache` may hold noise drawn for its members."""
        if iteration.iteration != self.iteration + 1:
            raise ReplayError(f"iteration {iteration.iteration} cannot follow iteration {self.iteration}; replay in ledger order")
        apply_iteration_(self.state, iteration_update(iteration), self.params.noise, self.base, self.params.decay, cache)
        self.iteration = iteration.iteration

    def state_hash(self) -> bytes:
        return state_hash(self.state)


def replica_from_genesis(model: nn.Module, genesis: Genesis, device: torch.device | str = "cpu") -> Replica:
    """A replica at iteration 0: the checked base state of `model`, the parameters from the job spec."""
    base = base_state(model, genesis).to(device)
    return Replica(replay_params(genesis_spec(genesis)), base)


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
    replica = replica_from_genesis(model, ledger_entries[0].entry.body, device)
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
