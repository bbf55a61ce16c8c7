"""A worker that fabricates its rewards (for the redundancy test): the real daemon, a dishonest backend.

Run as `python -m tests.support.lying_worker` with `swarmtune worker` arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

from swarmtune.backends import registry
from swarmtune.backends.base import Backend
from swarmtune.cli import main
from swarmtune.jobspec import JobSpec
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise
from swarmtune.state import MasterState
from swarmtune.tasks.base import Example, RewardFn

HONEST = registry.backend_factory("hf")  # looked up before the liar replaces the lookup


@dataclass(frozen=True)
class Fabricating:
    """Measures nothing honestly: every member gets a reward that is far from the truth but in range."""

    inner: Backend

    def set_center(self, state: MasterState) -> None:
        self.inner.set_center(state)

    def evaluate(self, members: Sequence[MemberNoise], examples: Sequence[Example], reward_fn: RewardFn, max_new_tokens: int) -> list[float]:
        return [1.0 for _ in members]

    def evaluate_each(
        self, members: Sequence[MemberNoise], member_examples: Sequence[Sequence[Example]], reward_fn: RewardFn, max_new_tokens: int
    ) -> list[float]:
        return [1.0 for _ in members]

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return self.inner.generate(prompts, max_new_tokens)


def fabricating_backend(model: Any, tokenizer: Any, state: MasterState, spec: JobSpec, device: str, noise_cache: NoiseCache | None) -> Backend:
    return Fabricating(HONEST(model, tokenizer, state, spec, device, noise_cache))


if __name__ == "__main__":
    # `swarmtune worker` looks its backend up by name at run time: every name now gives the liar.
    registry.backend_factory = lambda name: fabricating_backend
    sys.exit(main(["worker", *sys.argv[1:]]))
