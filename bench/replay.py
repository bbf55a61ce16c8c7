"""Replay bench: replay throughput against the training time of the same job, low-rank and dense.

Run with no arguments (a few minutes on 2 idle CPU cores). Progress goes to stderr; the last line on
stdout is one JSON object. The model is a ~34M-parameter Llama built locally (`build_random_model`,
float32); the job: population 32 (antithetic), 16 prompts, 32 new tokens, z-score shaping.
Per family, a few iterations are trained, each replayed right after it, in this process:
  training = the HF backend evaluating the population on the iteration's prompts (batched low-rank
             generation, or member by member with materialised weights for dense), shaping, the exact
             update and deriving the new center weights: one site's work per iteration. Generation
             runs for a slice of the members (EVALUATED) and its time is scaled to the population
             (its cost is linear in members); members outside the slice reuse the slice's rewards,
             which keeps coefficient magnitudes, all the update's cost depends on;
  replay   = the exact update alone (`update.apply_iteration_`, what `replay.Replica.apply` runs),
             from the same base state and the same integer coefficients; its final state hash must
             equal training's.
Keys (per family F in lowrank, dense):
  F_train_s_per_iteration, F_replay_s_per_iteration   medians over the measured iterations
  F_replay_iterations_per_s, F_replay_parameters_per_s  parameters updated = non-frozen elements
  F_replay_speedup                                       training time / replay time, median over
                                                         iterations (goal: lowrank >= 50)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarmtune.backends.hf import HFBackend
from swarmtune.modelbuild import build_random_model
from swarmtune.models import load_model
from swarmtune.noise import NoiseConfig
from swarmtune.seeds import population
from swarmtune.shaping import coefficients
from swarmtune.state import build_plan, master_from_model, state_hash
from swarmtune.tasks.base import Example
from swarmtune.update import IterationUpdate, apply_iteration_

MODEL = {"hidden": 512, "layers": 8, "heads": 8, "intermediate": 2048}  # ~34M parameters
POPULATION = 32  # antithetic pairs: 16 noise draws
PROMPTS = 16
MAX_NEW_TOKENS = 32
SIGMA, ALPHA, JOB_SEED = 1e-3, 5e-4, 2026
ITERATIONS = 2
EVALUATED = {"lowrank": 4, "dense": 2}  # members generated per iteration; whole antithetic pairs
NOISE = {"lowrank": NoiseConfig(family="lowrank", rank=1), "dense": NoiseConfig(family="dense", distribution="gaussian")}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def digit_share(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
    """A reward that perturbations move: the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def prompts(iteration: int) -> list[Example]:
    return [Example(f"{(iteration * 7 + i) % 50}+{(i * 3) % 50}=") for i in range(PROMPTS)]


@dataclass(frozen=True)
class Measured:
    """Per-iteration training and replay times of one job, and how many parameters its update touches."""

    train_s: tuple[float, ...]
    replay_s: tuple[float, ...]
    updated: int


def measure(model_dir: Path, family: str) -> Measured:
    """Train iterations as one site does, replaying each right after it (both see the same machine load).

    Training: evaluate the population, shape, update exactly, derive the center. Replay: a second copy
    of the base state, advanced by the exact update alone; it must end in training's state.
    """
    model, tokenizer = load_model(model_dir)
    noise = NOISE[family]
    base = master_from_model(model, build_plan(model, family))
    state, replayed = base.clone(), base.clone()
    evaluator = HFBackend(model, tokenizer, state, noise, SIGMA, "cpu")
    train_s, replay_s = [], []
    for t in range(1, ITERATIONS + 1):
        members = population(JOB_SEED, t, POPULATION, antithetic=True)
        evaluated = members[: EVALUATED[family]]
        started = time.perf_counter()
        measured = evaluator.evaluate(evaluated, prompts(t), digit_share, MAX_NEW_TOKENS)
        evaluation_s = (time.perf_counter() - started) * len(members) / len(evaluated)
        rewards = [measured[m % len(measured)] for m in range(len(members))]
        started = time.perf_counter()
        update = IterationUpdate(members, tuple(coefficients(rewards, "zscore", ALPHA)))
        apply_iteration_(state, update, noise)
        evaluator.set_center(state)
        update_s = time.perf_counter() - started
        started = time.perf_counter()
        apply_iteration_(replayed, update, noise)
        replay_s.append(time.perf_counter() - started)
        train_s.append(evaluation_s + update_s)
        log(
            f"{family}: iteration {t}: evaluation {evaluation_s:.1f} s (scaled from {len(evaluated)} members), "
            f"update {update_s:.2f} s; replay {replay_s[-1]:.2f} s"
        )
    if state_hash(replayed) != state_hash(state):
        raise SystemExit(f"{family}: replay did not reproduce the trained state; the bench measured nothing valid")
    updated = sum(spec.numel for spec in base.specs if spec.treatment != "frozen")
    return Measured(tuple(train_s), tuple(replay_s), updated)


def figures(family: str, measured: Measured) -> dict[str, float]:
    train_s = statistics.median(measured.train_s)
    replay_s = statistics.median(measured.replay_s)
    # Ratios of adjacent measurements: robust to the machine's load changing during the run.
    speedup = statistics.median(t / r for t, r in zip(measured.train_s, measured.replay_s))
    return {
        f"{family}_train_s_per_iteration": round(train_s, 4),
        f"{family}_replay_s_per_iteration": round(replay_s, 5),
        f"{family}_replay_iterations_per_s": round(1 / replay_s, 3),
        f"{family}_replay_parameters_per_s": round(measured.updated / replay_s),
        f"{family}_parameters_updated": measured.updated,
        f"{family}_replay_speedup": round(speedup, 2),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(Path(tmp) / "model", **MODEL)
        parameters = sum(p.numel() for p in load_model(model_dir)[0].parameters())
        log(f"model: {parameters / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
        result: dict[str, Any] = {
            "model_parameters": parameters,
            "population": POPULATION,
            "members_generated": EVALUATED,
            "prompts": PROMPTS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "threads": torch.get_num_threads(),
        }
        for family in ("lowrank", "dense"):
            result |= figures(family, measure(model_dir, family))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
