"""A real signed ledger of a tiny model (genesis, then iterations with signed rewards), and its states
computed without replay.py: what replay and the audit are checked against."""

from __future__ import annotations

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import batches, entries, identity, ledger, shaping, state
from swarmtune.batches import Recorded
from swarmtune.entries import Iteration, NoisePlan
from swarmtune.noise import NOISE_VERSION, NoiseConfig
from swarmtune.replay import genesis_plan
from swarmtune.update import IterationUpdate, apply_iteration_, decay_integer

SPEC = b"""
[job]
id = "replay-test"
seed = 11
model = "unused"
iterations = 3

[task]
name = "countdown"

[es]
population = 4
anchored_decay = 0.01

[noise]
family = "lowrank"
lowrank_others = "dense"
"""
NOISE = NoiseConfig(family="lowrank", rank=1)


def base_of(model: torch.nn.Module) -> state.MasterState:
    return state.master_from_model(model, state.build_plan(model, "lowrank", "dense"))


def build_ledger(
    model: torch.nn.Module, iterations: int = 3, coordinator: Ed25519PrivateKey | None = None, worker: Ed25519PrivateKey | None = None
) -> list[bytes]:
    """Genesis of `model` under the spec's plan, then `iterations` iterations, every member rewarded by
    `worker` and shaped as the spec says (sound for the audit too)."""
    coordinator, worker = coordinator or identity.generate_key(), worker or identity.generate_key()
    base = base_of(model)
    genesis = entries.new_genesis(
        SPEC,
        state.state_hash(base),
        identity.public_key_bytes(coordinator),
        protocol_version=entries.PROTOCOL_VERSION,
        noise_version=NOISE_VERSION,
        shaping_version=shaping.SHAPING_VERSION,
        tensor_plan=genesis_plan(base),
        admitted_workers=(identity.public_key_bytes(worker),),
    )
    stored = [entries.seal(coordinator, entries.first_entry("replay-test", genesis, 0))]
    for t in range(1, iterations + 1):
        head = entries.parse_entry(stored[-1])
        rewards = tuple(float((t * 3 + m) % 4) for m in range(4))
        batch = batches.sign_batch(worker, "replay-test", t, head.hash, range(4), rewards)
        coefficients = tuple(shaping.coefficients(rewards, "zscore", 5e-4))
        body = Iteration(t, head.hash, NoisePlan(11, 4, False), (Recorded(batch),), coefficients, (), "zscore")
        stored.append(entries.seal(coordinator, entries.next_entry(head, body, t)))
    return stored


def direct_hashes(model: torch.nn.Module, stored: list[bytes]) -> list[bytes]:
    """The same updates applied without replay.py: the hash after each iteration entry."""
    base = base_of(model)
    current, hashes = base.clone(), []
    for _, entry in list(ledger.walk(stored))[1:]:  # the walk derives each entry's coefficients
        body = entry.entry.body
        assert isinstance(body, Iteration)
        apply_iteration_(current, IterationUpdate(body.members, body.coefficients), NOISE, base, decay_integer(0.01))
        hashes.append(state.state_hash(current))
    return hashes
