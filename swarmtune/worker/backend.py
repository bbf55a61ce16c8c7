"""Evaluation backends a worker can run members on, behind one small interface."""

from __future__ import annotations

import importlib.util
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

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]: ...


# make_backend(model, tokenizer, base state, job spec, device, noise cache) -> a ready Backend.
BackendFactory = Callable[[Any, Any, MasterState, JobSpec, str, NoiseCache], Backend]


def hf_backend(model: Any, tokenizer: Any, state: MasterState, spec: JobSpec, device: str, noise_cache: NoiseCache) -> Backend:
    from swarmtune.evaluation import HFEvaluator

    return HFEvaluator(model, tokenizer, state, spec.noise, spec.sigma, device, noise_cache=noise_cache)


def backend_factory(name: str) -> BackendFactory:
    """The factory of a backend by name (`hf`); `vllm` is planned but not available yet."""
    if name == "hf":
        return hf_backend
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise BackendError("vllm is not installed, and its backend is not supported yet; run with --backend hf")
        raise BackendError("the vllm backend is not supported yet in this swarmtune; run the worker with --backend hf")
    raise BackendError(f"unknown backend {name!r}; use --backend hf")
