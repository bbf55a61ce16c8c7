"""Replay bench: replay throughput against the training time of the same job, low-rank and dense.

Run with no arguments (a few minutes on 2 idle CPU cores). Progress goes to stderr; the last line on
stdout is one JSON object. The model is a ~34M-parameter Llama built locally (`build_random_model`,
float32); the job: population 32 (antithetic), 16 prompts, 32 new tokens, z-score shaping.
Per family, a few iterations are trained and then replayed, side by side in this process:
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
  F_replay_speedup                                       training time / replay time (goal: lowrank >= 50)
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

from swarmtune.evaluation import HFEvaluator
from swarmtune.models import build_random_model, load_model
from swarmtune.noise import NoiseConfig
from swarmtune.seeds import population
from swarmtune.shaping import coefficients
from swarmtune.state import MasterState, build_plan, master_from_model, state_hash
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
class Trained:
    """A few trained iterations: base state, the updates in order, per-iteration times, final hash."""

    base: MasterState
    updates: tuple[IterationUpdate, ...]
    seconds: tuple[float, ...]
    final_hash: bytes


def train(model_dir: Path, family: str) -> Trained:
    """One site training the job: evaluate the population, shape, update exactly, derive the center."""
    model, tokenizer = load_model(model_dir)
    noise = NOISE[family]
    base = master_from_model(model, build_plan(model, family))
    state = base.clone()
    evaluator = HFEvaluator(model, tokenizer, state, noise, SIGMA, "cpu")
    updates, seconds = [], []
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
        seconds.append(evaluation_s + update_s)
        updates.append(update)
        log(f"{family}: iteration {t}: evaluation {evaluation_s:.1f} s (scaled from {len(evaluated)} members), update {update_s:.2f} s")
    return Trained(base, tuple(updates), tuple(seconds), state_hash(state))


def replay_seconds(trained: Trained, family: str) -> tuple[float, ...]:
    """Per-iteration replay times from the base state; checks replay reaches training's state."""
    state = trained.base.clone()
    seconds = []
    for update in trained.updates:
        started = time.perf_counter()
        apply_iteration_(state, update, NOISE[family])
        seconds.append(time.perf_counter() - started)
    if state_hash(state) != trained.final_hash:
        raise SystemExit(f"{family}: replay did not reproduce the trained state; the bench measured nothing valid")
    log(f"{family}: replayed {len(seconds)} iterations in {sum(seconds):.3f} s")
    return tuple(seconds)


def figures(family: str, trained: Trained, replayed: tuple[float, ...]) -> dict[str, float]:
    train_s = statistics.median(trained.seconds)
    replay_s = statistics.median(replayed)
    updated = sum(spec.numel for spec in trained.base.specs if spec.treatment != "frozen")
    return {
        f"{family}_train_s_per_iteration": round(train_s, 4),
        f"{family}_replay_s_per_iteration": round(replay_s, 5),
        f"{family}_replay_iterations_per_s": round(1 / replay_s, 3),
        f"{family}_replay_parameters_per_s": round(updated / replay_s),
        f"{family}_parameters_updated": updated,
        f"{family}_replay_speedup": round(train_s / replay_s, 2),
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
            trained = train(model_dir, family)
            result |= figures(family, trained, replay_seconds(trained, family))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
