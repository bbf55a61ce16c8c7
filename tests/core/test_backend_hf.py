"""The HF backend: low-rank batching equals materialised members; dense restore is exact."""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from swarmtune.backends.hf import HFBackend, cache_keyword, decode_completions, encode_prompts, greedy_tokens, lowrank_hooks, stop_token_ids
from swarmtune.backends.perturbation import lowrank_deltas, perturbed_weights, uses_lowrank_batching
from swarmtune.fixedpoint import derive
from swarmtune.models import load_model
from swarmtune.noise import NoiseConfig
from swarmtune.seeds import MemberNoise, population
from swarmtune.shaping import sigma_integer
from swarmtune import state as state_module
from swarmtune.state import MasterState, build_plan, master_from_model
from swarmtune.tasks.base import Example

SIGMA = 0.01  # large enough that every member's greedy tokens differ from the center's
NEW_TOKENS = 12
EXAMPLES = (
    Example("12+34=", {"target": "46"}),
    Example("Using 3, 5 and 7, make 22.", {"target": "22"}),
    Example("a", {"target": "b"}),
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices gain nothing from threads, and on a shared 2-core machine threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model(tiny_model_dir)


class Recorder:
    """A TRL-style reward with a column that also keeps every completion batch it scored."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, ...]] = []

    def __call__(self, prompts: list[str], completions: list[str], target: list[str]) -> list[float]:
        assert prompts == [example.prompt for example in EXAMPLES]
        assert target == [example.columns["target"] for example in EXAMPLES]
        self.batches.append(tuple(completions))
        return [sum(map(ord, c)) / (1 + len(c)) + float(t in c) for c, t in zip(completions, target)]


def member_weights(state: MasterState, member: MemberNoise, sigma_int: int, noise: NoiseConfig, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """perturbed_weights' chunks put together, each tensor shaped."""
    chunks: dict[int, list[torch.Tensor]] = {}
    for index, start, weights in perturbed_weights(state, member, sigma_int, noise, dtype):
        assert start == sum(chunk.numel() for chunk in chunks.get(index, []))  # in order, contiguous
        chunks.setdefault(index, []).append(weights)
    return {index: torch.cat(parts).view(state.specs[index].shape) for index, parts in chunks.items()}


def evaluator(model: Any, tokenizer: Any, family: str, rank: int = 1, max_rows: int | None = None) -> HFBackend:
    state = master_from_model(model, build_plan(model, family))
    noise = NoiseConfig(family=family, distribution="gaussian", rank=rank)
    return HFBackend(model, tokenizer, state, noise, SIGMA, "cpu", max_rows=max_rows)


def parameter_bytes(model: Any) -> dict[str, bytes]:
    return {name: p.detach().numpy().tobytes() for name, p in model.named_parameters()}


@pytest.mark.parametrize("rank", [1, 2])
def test_lowrank_batched_equals_materialised(loaded: tuple[Any, Any], rank: int) -> None:
    model, tokenizer = loaded
    ev = evaluator(model, tokenizer, "lowrank", rank)
    members = population(7, 3, 6, antithetic=True)
    batched, materialised = Recorder(), Recorder()
    rewards = ev.evaluate(members, EXAMPLES, batched, NEW_TOKENS)
    assert ev.evaluate(members, EXAMPLES, materialised, NEW_TOKENS, materialised=True) == rewards
    assert batched.batches == materialised.batches  # identical greedy tokens, row by row
    center = tuple(ev.generate([e.prompt for e in EXAMPLES], NEW_TOKENS))
    assert all(batch != center for batch in batched.batches)
    assert batched.batches[0] != batched.batches[1]  # + and - of one seed go different ways


def test_chunked_batches_equal_one_batch(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    members = population(1, 0, 6, antithetic=True)
    whole = evaluator(model, tokenizer, "lowrank").evaluate(members, EXAMPLES, Recorder(), NEW_TOKENS)
    # Two members (six rows) per generation: three chunks, then the same rewards.
    chunked = evaluator(model, tokenizer, "lowrank", max_rows=2 * len(EXAMPLES) + 1)
    assert chunked.evaluate(members, EXAMPLES, Recorder(), NEW_TOKENS) == whole


def test_hooked_linear_equals_materialised_linear(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    state = master_from_model(model, build_plan(model, "lowrank"))
    noise = NoiseConfig(family="lowrank", rank=2)
    sigma_int = sigma_integer(SIGMA)
    members = population(5, 1, 2, antithetic=True)
    deltas = lowrank_deltas(state, members, sigma_int, noise, torch.float32, "cpu")
    index = next(i for i, spec in enumerate(state.specs) if spec.name.endswith("mlp.down_proj.weight"))
    spec = state.specs[index]
    linear = model.get_submodule(spec.name.removesuffix(".weight"))
    x = torch.randn(len(members), 5, spec.shape[1], generator=torch.Generator().manual_seed(0))
    with lowrank_hooks(model, deltas), torch.no_grad():
        hooked = linear(x.clone())
    for row, member in enumerate(members):
        weight = member_weights(state, member, sigma_int, noise, torch.float32)[index]
        torch.testing.assert_close(hooked[row], x[row] @ weight.t(), rtol=1e-5, atol=1e-6)


def test_antithetic_perturbations_are_opposite(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    state = master_from_model(model, build_plan(model, "dense"))
    noise = NoiseConfig(family="dense", distribution="gaussian")
    plus, minus = population(11, 0, 2, antithetic=True)
    assert plus.seed == minus.seed and (plus.sign, minus.sign) == (1, -1)
    sigma_int = sigma_integer(SIGMA)
    ups = member_weights(state, plus, sigma_int, noise, torch.float64)
    downs = member_weights(state, minus, sigma_int, noise, torch.float64)
    assert set(ups) == set(downs) == set(range(len(state.specs)))
    for index, spec in enumerate(state.specs):
        center = derive(state.q[index], spec.exponent, torch.float64)
        up, down = ups[index] - center, downs[index] - center
        # Equal and opposite up to the float32 rounding (2^-24 relative) of each derived weight.
        assert ((up + down).abs() <= 2.0**-22 * (center.abs() + up.abs())).all()
        assert up.abs().max() > 0


def test_dense_perturb_restore_is_byte_exact(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    ev = evaluator(model, tokenizer, "dense")
    before = parameter_bytes(model)
    members = [MemberNoise(member=m, seed=1000 + m // 2, sign=1 - 2 * (m % 2)) for m in range(100)]
    rewards = ev.evaluate(members, EXAMPLES[:1], lambda p, c, **_: [float(len(c[0]))], 1)
    assert len(rewards) == 100
    ev.generate([EXAMPLES[0].prompt], 1)  # the center again, after 100 members wrote their weights
    assert parameter_bytes(model) == before
    for spec, q in zip(ev.state.specs, ev.state.q):
        derived = derive(q, spec.exponent, torch.float32).numpy().tobytes()
        assert model.get_parameter(spec.name).detach().numpy().tobytes() == derived


def test_dense_members_change_rewards(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    ev = evaluator(model, tokenizer, "dense")
    prompts = [e.prompt for e in EXAMPLES]
    center = ev.generate(prompts, NEW_TOKENS)
    center_reward = statistics.fmean(Recorder()(prompts, center, [e.columns["target"] for e in EXAMPLES]))
    recorder = Recorder()
    rewards = ev.evaluate(population(3, 0, 4, antithetic=True), EXAMPLES, recorder, NEW_TOKENS)
    assert all(batch != tuple(center) for batch in recorder.batches)
    assert len(set(rewards)) == 4 and center_reward not in rewards


def test_greedy_loop_matches_hf_generate(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    batch = encode_prompts(tokenizer, [e.prompt for e in EXAMPLES], "cpu")
    ours = greedy_tokens(model, batch, NEW_TOKENS, (), tokenizer.pad_token_id)
    with torch.inference_mode():
        theirs = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
        )
    assert torch.equal(ours, theirs[:, batch.input_ids.shape[1] :])


def test_greedy_loop_uses_the_current_cache_keyword(loaded: tuple[Any, Any]) -> None:
    """transformers 5.x deprecates `past_key_values` (removed in 5.40): the loop must not lean on it."""
    model, tokenizer = loaded
    batch = encode_prompts(tokenizer, [e.prompt for e in EXAMPLES], "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        greedy_tokens(model, batch, NEW_TOKENS, (), tokenizer.pad_token_id)


def test_cache_keyword_falls_back_for_older_transformers() -> None:
    class Older(torch.nn.Module):
        def forward(self, input_ids: Any, past_key_values: Any = None, use_cache: bool = False) -> None: ...

    class Newer(torch.nn.Module):
        def forward(self, input_ids: Any, cache: Any = None, use_cache: bool = False) -> None: ...

    assert (cache_keyword(Older()), cache_keyword(Newer())) == ("past_key_values", "cache")


def test_completions_stop_at_eos(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    stops = stop_token_ids(model, tokenizer)
    assert stops == (tokenizer.eos_token_id,)
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    tokens = torch.tensor([[a, b, stops[0], a], [b, b, b, b]])
    assert decode_completions(tokenizer, tokens, stops) == ["ab", "bbbb"]


def test_mode_follows_plan(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    plans = {
        "lowrank": build_plan(model, "lowrank"),
        "mixed": build_plan(model, "lowrank", lowrank_others="dense"),
        "dense": build_plan(model, "dense"),
    }
    batching = {name: uses_lowrank_batching(master_from_model(model, plan)) for name, plan in plans.items()}
    assert batching == {"lowrank": True, "mixed": False, "dense": False}


def test_set_center_writes_the_new_state(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    ev = evaluator(model, tokenizer, "dense")
    moved = MasterState(ev.state.specs, tuple(q + 1 for q in ev.state.q))
    ev.set_center(moved)
    ev.evaluate(population(2, 0, 2, antithetic=True), EXAMPLES[:1], lambda p, c, **_: [0.0], 2)
    ev.generate([EXAMPLES[0].prompt], 2)  # the center again, after the members left their weights
    for spec, q in zip(moved.specs, moved.q):
        assert torch.equal(model.get_parameter(spec.name).detach(), derive(q, spec.exponent, torch.float32))


def test_members_and_center_are_derived_in_place_chunk_by_chunk(loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows: a member's weights are derive(Q + P) in place, the center derive(Q) again
    afterwards (no cached copy of the center, no float undo); the backend shares the replica's Q."""
    model, tokenizer = loaded
    ev = evaluator(model, tokenizer, "dense")
    assert not hasattr(ev, "_center")
    monkeypatch.setattr(state_module, "CHUNK_ELEMENTS", 200)
    member = population(5, 1, 2, antithetic=True)[1]
    ev.evaluate([member], EXAMPLES[:1], lambda p, c, **_: [0.0], 1)
    expected = member_weights(ev.state, member, ev.sigma_int, ev.noise, torch.float32)
    for index, spec in enumerate(ev.state.specs):
        assert torch.equal(model.get_parameter(spec.name).detach(), expected[index].to(model.dtype)), spec.name
    ev.state.q[0].view(-1)[:5] += 3  # the replica's update, in place
    ev.set_center(ev.state)
    ev.generate([EXAMPLES[0].prompt], 1)
    for spec, q in zip(ev.state.specs, ev.state.q):
        assert torch.equal(model.get_parameter(spec.name).detach(), derive(q, spec.exponent, model.dtype)), spec.name
