"""The task interface: examples, deterministic per-iteration sampling, and TRL-style rewards."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

# TRL's GRPOTrainer reward signature: (prompts, completions, **columns) -> list[float].
# Columns are the dataset fields of each example, passed as parallel lists.
RewardFn = Callable[..., list[float]]


@dataclass(frozen=True)
class Example:
    """One dataset row: the formatted prompt and the columns its reward needs."""

    prompt: str
    columns: Mapping[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """What the coordinator, workers and the demo need from a task."""

    name: str
    reward_range: tuple[float, float]  # results outside it are rejected by the coordinator

    def train(self) -> Sequence[Example]: ...

    def held_out(self) -> Sequence[Example]: ...

    def reward(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]: ...


def sample_indices(job_seed: int, iteration: int, size: int, k: int, salt: str = "train") -> list[int]:
    """Indices of the prompt batch of iteration t: the same on every site, from (job seed, t)."""
    digest = hashlib.sha256(f"swarmtune/prompts/v1/{salt}/{job_seed}/{iteration}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    if k >= size:
        return list(range(size))
    return sorted(rng.sample(range(size), k))


def columns_of(examples: Sequence[Example]) -> dict[str, list[Any]]:
    """Example columns as parallel lists, the shape TRL reward functions take."""
    keys = sorted({key for ex in examples for key in ex.columns})
    return {key: [ex.columns.get(key) for ex in examples] for key in keys}
