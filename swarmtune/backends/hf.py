"""The Hugging Face backend: one reward per ES member, by materialised or low-rank batched greedy decoding."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from swarmtune.backends.base import examples_per_member, mean_reward, shared_examples
from swarmtune.backends.perturbation import LowRankDelta, lowrank_deltas, perturbed_weights, uses_lowrank_batching
from swarmtune.jobspec import JobSpec
from swarmtune.noise import NoiseConfig
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise
from swarmtune.shaping import sigma_integer
from swarmtune.state import MasterState, write_derived, write_weights
from swarmtune.tasks.base import Example, RewardFn, columns_of


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded token ids of a prompt batch and their attention mask (rows × length)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def repeat(self, times: int) -> PromptBatch:
        """The batch `times` over, member-major: row m·P + p is prompt p of member m."""
        return PromptBatch(self.input_ids.repeat(times, 1), self.attention_mask.repeat(times, 1))

    def slice(self, start: int, stop: int) -> PromptBatch:
        """Rows start..stop-1."""
        return PromptBatch(self.input_ids[start:stop], self.attention_mask[start:stop])


def encode_prompts(tokenizer: Any, prompts: Sequence[str], device: torch.device | str) -> PromptBatch:
    """Tokenize once, left padded so every row's next token is at the last position."""
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    return PromptBatch(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))


def encode_member_prompts(tokenizer: Any, prompts: Sequence[Sequence[str]], device: torch.device | str) -> PromptBatch:
    """Every member's prompts as one batch, member-major: each distinct prompt tokenized once, all
    padded to the longest (with shared prompts: the rows `encode_prompts(...).repeat(members)` gives)."""
    distinct = list(dict.fromkeys(prompt for member in prompts for prompt in member))
    encoded = encode_prompts(tokenizer, distinct, device)
    position = {prompt: row for row, prompt in enumerate(distinct)}
    rows = torch.tensor([position[prompt] for member in prompts for prompt in member], device=encoded.input_ids.device)
    return PromptBatch(encoded.input_ids[rows], encoded.attention_mask[rows])


def stop_token_ids(model: nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids from the generation config (an int or a list), else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return ()
    return tuple(configured) if isinstance(configured, (list, tuple)) else (int(configured),)


def greedy_tokens(
    model: nn.Module, batch: PromptBatch, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int
) -> torch.Tensor:
    """Greedy continuations (rows × steps) using the model's KV cache; a row is padded after its EOS.

    A lean loop rather than `generate`: HF's per-step bookkeeping dominates for small models.
    """
    rows = batch.rows
    device = batch.input_ids.device
    mask = batch.attention_mask
    cache = cache_keyword(model)
    # Left padding: positions count real tokens only, as HF generate computes them.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    with torch.inference_mode():
        output = model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            # The last position as an index tensor, not `1`: a slice leaves a strided (rows, 1, hidden)
            # view, and torch's matmul then expands the lm_head weight to rows × hidden × vocab (6.5 s
            # and 3.7 GB at rows 64, vocab 32k on CPU) instead of one GEMM on a contiguous copy.
            logits_to_keep=torch.tensor([batch.input_ids.shape[1] - 1], device=device),
        )
        positions = positions[:, -1:]
        for step in range(max_new_tokens):
            # max's indices are argmax's (the first maximum of a row) at a quarter of its time on
            # bf16 CPU logits (7 vs 30 ms for 64 rows × 151,936).
            token = output.logits[:, -1].max(-1).indices.masked_fill_(finished, pad_id)
            steps.append(token)
            finished |= torch.isin(token, stops)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            positions = positions + 1
            output = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                **{cache: getattr(output, cache)},
                use_cache=True,
            )
    return torch.stack(steps, dim=1) if steps else batch.input_ids.new_empty(rows, 0)


def cache_keyword(model: nn.Module) -> str:
    """The name of the KV cache in a forward call and its output: `cache` since transformers 5.x
    deprecated `past_key_values` (removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_completions(tokenizer: Any, tokens: torch.Tensor, stop_ids: Sequence[int]) -> list[str]:
    """Completion texts: each row cut before its first EOS, special tokens skipped (as TRL decodes)."""
    texts = []
    for row in tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def _add_lowrank(delta: LowRankDelta) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
    # x·B as a plain batched GEMM on a contiguous B (members, in, r): no transposed operand to copy per
    # call (bf16, torch 2.13, 2 threads: low-rank evaluation 0.80-0.85x -> 0.92-0.94x of decoding).
    b = delta.b_t.transpose(1, 2).contiguous()

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        members = b.shape[0]
        x = args[0].reshape(members, -1, args[0].shape[-1])
        grouped = output.view(members, -1, output.shape[-1])
        return grouped.baddbmm_(torch.bmm(x, b), delta.a_t).view(output.shape)

    return hook


@contextlib.contextmanager
def lowrank_hooks(model: nn.Module, deltas: Sequence[LowRankDelta]) -> Iterator[None]:
    """Forward hooks adding each member's low-rank term to its rows, removed on exit."""
    handles = [model.get_submodule(d.module).register_forward_hook(_add_lowrank(d)) for d in deltas]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class HFBackend:
    """Evaluates ES members on a Hugging Face causal LM whose weights are derived from a master state.

    Call set_center after the master state changes (for example after an update was applied). The
    master state stays on the host (Q, 4 bytes a parameter; a frozen tensor's is spilled to disk and
    derived into its param once, here); the device holds only the model's params and one chunk's scratch.
    `noise_cache` keeps each seed's noise (dense, or low-rank factors) for its antithetic twin and the update that follows.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        state: MasterState,
        noise: NoiseConfig,
        sigma: float,
        device: torch.device | str,
        max_rows: int | None = None,
        noise_cache: NoiseCache | None = None,
    ) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.model = model
        self.tokenizer = tokenizer
        self.noise = noise
        self.sigma_int = sigma_integer(sigma)
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.noise_cache = noise_cache
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.state = state  # on the host, shared with the replica (which updates it in place)
        write_weights(model, state)  # frozen tensors keep these for good
        self.trainable = tuple(
            (index, spec, model.get_parameter(spec.name)) for index, spec in enumerate(state.specs) if spec.treatment != "frozen"
        )
        self._center_shown = True

    def set_center(self, state: MasterState) -> None:
        """Evaluate around `state` from now on. Its derived weights are written when a generation needs
        them: dense members never do (each writes every trainable tensor), so a dense worker skips it."""
        self.state = state
        self._center_shown = False

    def _show_center(self) -> None:
        """The center's derived weights written into the model's params from Q, chunk by chunk (after
        members too: derived again from Q, exact, never a float undo of the perturbation)."""
        if self._center_shown:
            return
        for index, _, param in self.trainable:
            write_derived(param, self.state, index)
        self._center_shown = True

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of the center model (completion text only)."""
        self._show_center()
        return self._completions(encode_prompts(self.tokenizer, prompts, self.device), max_new_tokens)

    def evaluate(
        self,
        members: Sequence[MemberNoise],
        examples: Sequence[Example],
        reward_fn: RewardFn,
        max_new_tokens: int,
        materialised: bool = False,
    ) -> list[float]:
        """One reward per member: the mean of reward_fn over the prompt batch under its perturbation."""
        return self.evaluate_each(members, shared_examples(members, examples), reward_fn, max_new_tokens, materialised)

    def evaluate_each(
        self,
        members: Sequence[MemberNoise],
        member_examples: Sequence[Sequence[Example]],
        reward_fn: RewardFn,
        max_new_tokens: int,
        materialised: bool = False,
    ) -> list[float]:
        """One reward per member: the mean of reward_fn over its own examples under its perturbation
        (low-rank members all in one batched generation, whatever prompts each has)."""
        per = examples_per_member(members, member_examples)
        if not per:
            return []
        prompts = [[example.prompt for example in examples] for examples in member_examples]
        batch = encode_member_prompts(self.tokenizer, prompts, self.device)
        if materialised or not uses_lowrank_batching(self.state):
            rows = [batch.slice(i * per, (i + 1) * per) for i in range(len(members))]
            completions = [self._member_completions(member, own, max_new_tokens) for member, own in zip(members, rows)]
        else:
            completions = self._batched_completions(members, batch, per, max_new_tokens)
        return [
            mean_reward(reward_fn, own, texts, columns_of(examples))
            for own, texts, examples in zip(prompts, completions, member_examples)
        ]

    def _completions(self, batch: PromptBatch, max_new_tokens: int) -> list[str]:
        """Greedy completions of whatever weights the model holds now."""
        tokens = greedy_tokens(self.model, batch, max_new_tokens, self.stop_ids, self.pad_id)
        return decode_completions(self.tokenizer, tokens, self.stop_ids)

    def _member_completions(self, member: MemberNoise, batch: PromptBatch, max_new_tokens: int) -> list[str]:
        """The member's derived weights written over every trainable tensor, then its completions."""
        self._center_shown = False  # from the first write on, the model holds no center
        params = {index: param.data.view(-1) for index, _, param in self.trainable}
        chunks = perturbed_weights(self.state, member, self.sigma_int, self.noise, torch.float32, self.noise_cache, self.device)
        with torch.no_grad():
            for index, start, weights in chunks:
                params[index][start : start + weights.numel()].copy_(weights)  # float32 -> param dtype: derive's last rounding
        return self._completions(batch, max_new_tokens)

    def _batched_completions(
        self, members: Sequence[MemberNoise], batch: PromptBatch, per: int, max_new_tokens: int
    ) -> list[list[str]]:
        """All members in one greedy generation (chunked by whole members when max_rows is set); `batch`
        holds `per` rows a member, member-major."""
        self._show_center()
        dtype = self.trainable[0][2].dtype
        deltas = lowrank_deltas(self.state, members, self.sigma_int, self.noise, dtype, self.device, self.noise_cache)
        per_chunk = max(1, self.max_rows // per) if self.max_rows else len(members)
        texts: list[str] = []
        for start in range(0, len(members), per_chunk):
            stop = min(start + per_chunk, len(members))
            with lowrank_hooks(self.model, [d.members(start, stop) for d in deltas]):
                texts += self._completions(batch.slice(start * per, stop * per), max_new_tokens)
        return [texts[i : i + per] for i in range(0, len(texts), per)]


def build(
    model: nn.Module, tokenizer: Any, state: MasterState, spec: JobSpec, device: str, noise_cache: NoiseCache | None
) -> HFBackend:
    """The HF backend of a job (its registry entry: a BackendFactory)."""
    return HFBackend(model, tokenizer, state, spec.noise, spec.sigma, device, noise_cache=noise_cache)
