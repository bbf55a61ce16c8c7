"""The backend protocol: what a worker asks of an evaluation backend, and what a member's reward is."""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Sequence

from swarmtune.jobspec import JobSpec
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise
from swarmtune.state import MasterState
from swarmtune.tasks.base import Example, RewardFn


class BackendError(Exception):
    """The requested backend cannot run here; the message says what to use instead."""


class Backend(Protocol):
    """Derives weights from a master state and measures rewards of ES members on prompt batches."""

    def set_center(self, state: MasterState) -> None: ...

    def evaluate(
        self, members: Sequence[MemberNoise], examples: Sequence[Example], reward_fn: RewardFn, max_new_tokens: int
    ) -> list[float]: ...

    def evaluate_each(
        self, members: Sequence[MemberNoise], member_examples: Sequence[Sequence[Example]], reward_fn: RewardFn, max_new_tokens: int
    ) -> list[float]: ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]: ...


# make_backend(model, tokenizer, base state, job spec, device, noise cache) -> a ready Backend.
# The noise cache keeps members' noise for the update; None where nothing is evaluated (greedy only).
BackendFactory = Callable[[Any, Any, MasterState, JobSpec, str, NoiseCache | None], Backend]


def mean_reward(
    reward_fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
) -> float:
    """Mean of a TRL-style reward over one member's prompt batch (math.fsum: order-exact sum)."""
    values = reward_fn(prompts, completions, **columns)
    if len(values) != len(completions):
        raise ValueError(f"reward function returned {len(values)} values for {len(completions)} completions")
    return math.fsum(float(value) for value in values) / len(values)


def shared_examples(members: Sequence[MemberNoise], examples: Sequence[Example]) -> list[Sequence[Example]]:
    """The one-group case of `evaluate_each`: every member on the same examples."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    return [examples] * len(members)


def examples_per_member(members: Sequence[MemberNoise], member_examples: Sequence[Sequence[Example]]) -> int:
    """How many examples each member is evaluated on; they must all have the same number (one batch
    holds every member's rows, member-major)."""
    if len(member_examples) != len(members):
        raise ValueError(f"{len(member_examples)} example lists for {len(members)} members; give one list per member")
    counts = {len(examples) for examples in member_examples}
    if 0 in counts:
        raise ValueError("evaluate needs at least one example per member")
    if len(counts) > 1:
        raise ValueError(f"members have {sorted(counts)} examples each; every member needs the same number")
    return counts.pop() if counts else 0
