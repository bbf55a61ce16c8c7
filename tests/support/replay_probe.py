"""Subprocess body of the cross-capability test: replay random iterations, print hashes as JSON."""

from __future__ import annotations

import hashlib
import json
import random
import sys

import torch
from transformers import AutoModelForCausalLM

from swarmtune import shaping, state, update
from swarmtune.noise import NoiseConfig
from swarmtune.seeds import population


def replay_hashes(model_dir: str, family: str, iterations: int) -> dict[str, str]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = NoiseConfig(family=family, distribution="gaussian", rank=2)
    base = state.master_from_model(model, state.build_plan(model, family))
    current = base.clone()
    rng = random.Random(1234)  # rewards are recorded facts; here, arbitrary but fixed
    for t in range(iterations):
        members = population(99, t, 8, antithetic=True)
        rewards = [rng.random() for _ in members]
        coefficients = tuple(shaping.coefficients(rewards, "zscore", 0.05))
        update.apply_iteration_(current, update.IterationUpdate(members, coefficients), config, base, update.decay_integer(1e-3))
    state.write_weights(model, current)
    derived = hashlib.sha256()
    for _, param in state.canonical_parameters(model):
        derived.update(param.detach().numpy().tobytes())
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
        "state": state.state_hash(current).hex(),
        "derived": derived.hexdigest(),
    }


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps({family: replay_hashes(sys.argv[1], family, iterations=4) for family in ("dense", "lowrank")}))
