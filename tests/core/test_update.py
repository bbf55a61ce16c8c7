"""The exact update against the pure-Python reference; order independence; decay; overflow."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmtune import update
from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import Q_DTYPE, FixedPointOverflow
from swarmtune.noise import NoiseConfig
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise, population
from swarmtune import state as state_module
from swarmtune.replay import spilled_base
from swarmtune.state import MasterState
from tests.support import spec_reference as ref


def single_tensor_state(treatment: str, shape: tuple[int, ...], exponent: int = 40) -> MasterState:
    numel = 1
    for dim in shape:
        numel *= dim
    q = (torch.arange(numel, dtype=torch.int64).view(shape) * 7_919 - 7).to(Q_DTYPE)
    return MasterState((TensorSpec("w", shape, exponent, treatment),), (q,))


def whole_delta(spec: TensorSpec, index: int, weights: dict[int, int], noise: NoiseConfig) -> torch.Tensor:
    """A tensor's ΔQ, its chunks put together."""
    return torch.cat([delta for _, _, delta in update.tensor_deltas(spec, index, weights, noise, "cpu")])


# Tensors below and above the Gaussian alphabet's 65,536 values: the update maps whichever is smaller.
SHAPES = [(5, 7), (263, 251)]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("exponent", [40, 33])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_update_matches_reference(distribution: str, exponent: int, shape: tuple[int, int]) -> None:
    state = single_tensor_state("dense", shape, exponent)
    before = state.q[0].flatten().tolist()
    members = population(11, 2, 4, antithetic=True)
    coefficients = (12345678, -987654, 55555, 3)
    update.apply_iteration_(state, update.IterationUpdate(members, coefficients), NoiseConfig("dense", distribution))
    weights = {}
    for m, c in zip(members, coefficients):
        weights[m.seed] = weights.get(m.seed, 0) + m.sign * c
    delta = ref.dense_delta(weights, 0, shape[0] * shape[1], distribution, exponent)
    assert state.q[0].flatten().tolist() == [b + d for b, d in zip(before, delta)]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("shape", SHAPES)
def test_member_perturbation_matches_reference(distribution: str, shape: tuple[int, int]) -> None:
    (spec,) = single_tensor_state("dense", shape, 37).specs
    member = population(3, 1, 2, antithetic=True)[1]
    sigma = 5_000_001
    state = single_tensor_state("dense", shape, 37)
    ((index, start, delta),) = update.member_deltas(state, member, sigma, NoiseConfig("dense", distribution))
    assert index == 0 and start == 0 and delta.shape == (spec.numel,)
    assert delta.flatten().tolist() == ref.dense_delta({member.seed: member.sign * sigma}, 0, spec.numel, distribution, 37)


@pytest.mark.parametrize("rank", [1, 3])
def test_lowrank_update_matches_reference(rank: int) -> None:
    state = single_tensor_state("lowrank", (6, 4), 10)  # a coarse grid keeps the large steps in range
    before = state.q[0].flatten().tolist()
    members = population(5, 9, 3, antithetic=False)
    coefficients = (2**41 + 1, -(2**40) - 17, 99)  # large: exercises the limb split of the GEMM
    update.apply_iteration_(state, update.IterationUpdate(members, coefficients), NoiseConfig("lowrank", rank=rank))
    weights = {m.seed: c for m, c in zip(members, coefficients)}
    delta = ref.lowrank_delta(weights, 0, 6, 4, rank, 10)
    assert state.q[0].flatten().tolist() == [b + d for b, d in zip(before, delta)]


@settings(max_examples=25, deadline=None)
@given(st.permutations(range(8)), st.lists(st.integers(-(2**30), 2**30), min_size=8, max_size=8))
def test_update_is_order_independent(order: list[int], coefficients: list[int]) -> None:
    members = population(1, 0, 8, antithetic=True)
    for config, treatment in [(NoiseConfig("dense", "gaussian"), "dense"), (NoiseConfig("lowrank", rank=2), "lowrank")]:
        in_order = single_tensor_state(treatment, (9, 5), 33)
        shuffled = single_tensor_state(treatment, (9, 5), 33)
        update.apply_iteration_(in_order, update.IterationUpdate(members, tuple(coefficients)), config)
        permuted = update.IterationUpdate(tuple(members[i] for i in order), tuple(coefficients[i] for i in order))
        update.apply_iteration_(shuffled, permuted, config)
        assert torch.equal(in_order.q[0], shuffled.q[0])


def test_split_iterations_sum_like_one() -> None:
    """Σ over members is exact: two half-populations give the same partial sums as one (before rounding)."""
    members = population(2, 0, 6, antithetic=False)
    coefficients = (10**6, -(10**6), 3 * 10**5, 7, -7, 2**20)
    spec = TensorSpec("w", (4, 4), 40, "dense")
    whole = whole_delta(spec, 0, update.seed_weights(members, coefficients), NoiseConfig("dense", "rademacher"))
    a = whole_delta(spec, 0, update.seed_weights(members[:3], coefficients[:3]), NoiseConfig("dense", "rademacher"))
    b = whole_delta(spec, 0, update.seed_weights(members[3:], coefficients[3:]), NoiseConfig("dense", "rademacher"))
    assert torch.equal(whole, a + b)  # Rademacher at F = 40 has shift 0: no rounding at all


def test_antithetic_pair_with_equal_coefficients_cancels() -> None:
    state = single_tensor_state("dense", (3, 3))
    before = state.q[0].clone()
    pair = (MemberNoise(0, 77, 1), MemberNoise(1, 77, -1))
    update.apply_iteration_(state, update.IterationUpdate(pair, (500, 500)), NoiseConfig("dense", "gaussian"))
    assert torch.equal(state.q[0], before)


@pytest.mark.parametrize("treatment", ["lowrank", "dense"])
def test_all_zero_coefficients_leave_the_state_and_still_decay(treatment: str) -> None:
    """All rewards tied (a weak model on a sparse task) gives every coefficient 0: nothing to draw."""
    base = single_tensor_state(treatment, (6, 5))
    state = base.clone()
    state.q[0].add_(1 << 30)
    tied = update.IterationUpdate(population(3, 1, 4, True), (0, 0, 0, 0))
    update.apply_iteration_(state, tied, NoiseConfig(treatment), base, 0, NoiseCache(1 << 20))
    assert torch.equal(state.q[0], base.q[0] + (1 << 30))
    decay = update.decay_integer(0.01)
    update.apply_iteration_(state, tied, NoiseConfig(treatment), base, decay)
    assert torch.equal(state.q[0], base.q[0] + (1 << 30) - ref.rne((1 << 30) * decay, 24))


def test_frozen_tensors_never_move() -> None:
    state = single_tensor_state("frozen", (3, 3))
    before = state.q[0].clone()
    update.apply_iteration_(state, update.IterationUpdate(population(1, 0, 2, False), (10**9, -(10**9))), NoiseConfig())
    assert torch.equal(state.q[0], before)


def test_anchored_decay_is_exact_and_pulls_toward_base() -> None:
    base = single_tensor_state("dense", (4, 4))
    state = base.clone()
    state.q[0].add_(torch.arange(16, dtype=Q_DTYPE).view(4, 4) * 2**26)
    decay = update.decay_integer(0.01)
    drift = (state.q[0] - base.q[0]).flatten().tolist()
    expected = [s - ref.rne(d * decay, 24) for s, d in zip(state.q[0].flatten().tolist(), drift)]
    update.apply_iteration_(state, update.IterationUpdate((), ()), NoiseConfig("dense"), base, decay)
    assert state.q[0].flatten().tolist() == expected
    with pytest.raises(ValueError, match="base state"):
        update.apply_iteration_(state, update.IterationUpdate((), ()), NoiseConfig("dense"), None, decay)


def test_overflow_raises_a_clear_error() -> None:
    state = single_tensor_state("dense", (2, 2))
    members = population(1, 0, 1, antithetic=False)
    with pytest.raises(FixedPointOverflow, match="left the fixed-point range"):
        update.apply_iteration_(state, update.IterationUpdate(members, (2**53,)), NoiseConfig("dense", "rademacher"))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_dense_sum_that_would_wrap_int64_raises(distribution: str) -> None:
    state = single_tensor_state("dense", (3, 3))
    members = population(1, 0, 4, antithetic=False)
    with pytest.raises(FixedPointOverflow, match="exceeds int64"):
        update.apply_iteration_(state, update.IterationUpdate(members, (2**61,) * 4), NoiseConfig("dense", distribution))


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="coefficients"):
        update.seed_weights(population(1, 0, 2, False), (1,))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seeds", [1, 3])
def test_small_tensors_generated_together_equal_each_alone(distribution: str, seeds: int) -> None:
    shapes = [(3, 5), (7,), (64, 65), (1,), (130,), (9, 11)]  # numels off the 4- and 64-element block sizes
    specs = tuple(TensorSpec(f"t{i}", shape, 40 - i % 2, "dense") for i, shape in enumerate(shapes))
    specs += (TensorSpec("frozen", (4,), 40, "frozen"),)
    state = MasterState(specs, tuple(torch.zeros(spec.shape, dtype=Q_DTYPE) for spec in specs))
    weights = {1000 + s: (s + 1) * 987_654_321 * (-1) ** s for s in range(seeds)}
    noise = NoiseConfig("dense", distribution)
    together = {index: delta for index, _, delta in update.state_deltas(state, weights, noise)}
    assert sorted(together) == list(range(len(shapes)))
    for index, spec in enumerate(specs[:-1]):
        alone = whole_delta(spec, index, weights, noise)
        assert torch.equal(together[index], alone), spec.name
    assert together[2].tolist() == ref.dense_delta(weights, 2, 64 * 65, distribution, 40)


@pytest.mark.parametrize("treatment, config", [("dense", NoiseConfig("dense", "gaussian")), ("lowrank", NoiseConfig("lowrank", rank=2))])
def test_chunked_update_with_spilled_base_equals_the_whole_tensor_one(
    treatment: str, config: NoiseConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row chunks (here of 3 rows of 251), a base read back from its spill file: the same Q as in one piece."""
    shape = (263, 251)  # above SMALL_TENSOR: chunked
    base = single_tensor_state(treatment, shape, 33)
    members = population(4, 2, 6, antithetic=True)
    change = update.IterationUpdate(members, (9_123_456, -4, 77_777_777, 0, -3_000_001, 5))
    decay = update.decay_integer(0.05)
    whole, chunked = base.clone(), base.clone()
    for current in (whole, chunked):
        current.q[0].view(-1)[::7] += 12_345  # a drift for the decay to pull back
    update.apply_iteration_(whole, change, config, base, decay)
    monkeypatch.setattr(state_module, "CHUNK_ELEMENTS", 3 * 251 + 5)
    spilled = spilled_base(base)
    update.apply_iteration_(chunked, change, config, spilled, decay, NoiseCache(1 << 20))
    assert torch.equal(whole.q[0], chunked.q[0]) and chunked.q[0].dtype == Q_DTYPE
    assert torch.equal(spilled.read(0, 500, 1700), base.run(0, 500, 1700))
    spilled.close()


def test_a_step_past_int32_is_refused_before_it_is_stored() -> None:
    """Q + ΔQ is formed in int64 and checked: an int32 add would have wrapped to a negative weight."""
    state = single_tensor_state("dense", (2, 2))
    state.q[0].fill_(2**31 - 3)
    members = population(1, 0, 1, antithetic=False)
    with pytest.raises(FixedPointOverflow, match="2\\^31"):
        update.apply_iteration_(state, update.IterationUpdate(members, (4,)), NoiseConfig("dense", "rademacher"))
    assert int(state.q[0].min()) >= 2**31 - 4  # never wrapped


def test_the_cache_gives_empty_factors_for_no_seeds() -> None:
    """All coefficients zero leaves no seed to draw: empty stacks, not a torch.stack([]) crash."""
    a, b = NoiseCache(1 << 20).factors([], 3, 40, 24, 2, "cpu")
    assert a.shape == (0, 40, 2) and b.shape == (0, 24, 2)


def test_chunked_noise_is_cached_per_chunk_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk of a large tensor is its own cache entry: a budget of a few chunks holds a few, never more."""
    monkeypatch.setattr(state_module, "CHUNK_ELEMENTS", 251 * 40)
    state = single_tensor_state("dense", (263, 251), 33)
    noise = NoiseConfig("dense", "gaussian")
    chunk = 251 * 40 * 2  # int16 Gaussian noise of one chunk
    cache = NoiseCache(3 * chunk + 1)
    members = population(6, 1, 2, antithetic=True)
    drawn = list(update.member_deltas(state, members[0], 40_000_003, noise, cache))
    assert len(drawn) == 7 and cache.bytes_held == 2 * chunk + 23 * 251 * 2  # the last three chunks (40, 40, 23 rows)
    plain = single_tensor_state("dense", (263, 251), 33)
    change = update.IterationUpdate(members, (5_000_000, -2))
    update.apply_iteration_(state, change, noise, cache=cache)
    update.apply_iteration_(plain, change, noise)
    assert torch.equal(state.q[0], plain.q[0]) and cache.bytes_held <= cache.budget_bytes
