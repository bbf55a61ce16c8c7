"""The worker's noise cache (dense noise, low-rank factors): hits are exactly a regeneration; the update and members come out the same; bounded."""

from __future__ import annotations

import pytest
import torch

from swarmtune import update
from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import Q_DTYPE
from swarmtune.noise import NoiseConfig, dense_noise_map, noise_alphabet, population_factors
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import population
from swarmtune.state import MasterState

TENSORS = [(0, 300), (1, 7), (2, 70_000)]  # below and above the Gaussian alphabet's 65,536 values


def state_of(shapes: list[tuple[int, int]]) -> MasterState:
    specs = tuple(TensorSpec(f"w{i}", shape, 36 + i, "dense") for i, shape in enumerate(shapes))
    q = tuple((torch.arange(s.numel, dtype=torch.int64).view(s.shape) * 9_973 - 11).to(Q_DTYPE) for s in specs)
    return MasterState(specs, q)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_a_hit_is_the_same_draw(distribution: str) -> None:
    cache = NoiseCache(1 << 20)
    first = cache.noise(5, TENSORS[:2], distribution, "cpu")
    assert torch.equal(first, dense_noise_map(5, TENSORS[:2], distribution, noise_alphabet(distribution)))
    assert cache.noise(5, TENSORS[:2], distribution, "cpu") is first
    assert cache.bytes_held == first.numel() * first.element_size() == 307 * (2 if distribution == "gaussian" else 1)
    assert not torch.equal(cache.noise(6, TENSORS[:2], distribution, "cpu"), first)  # another seed, another draw


def test_the_budget_evicts_the_oldest_and_never_holds_what_does_not_fit() -> None:
    one = 307 * 2  # int16 Gaussian noise
    cache = NoiseCache(2 * one)
    a = cache.noise(1, TENSORS[:2], "gaussian", "cpu")
    cache.noise(2, TENSORS[:2], "gaussian", "cpu")
    cache.noise(3, TENSORS[:2], "gaussian", "cpu")  # seed 1 goes
    assert cache.bytes_held == 2 * one
    assert cache.noise(1, TENSORS[:2], "gaussian", "cpu") is not a
    cache.noise(9, TENSORS[2:], "gaussian", "cpu")  # larger than the whole budget: not kept
    assert cache.bytes_held == 2 * one
    with pytest.raises(ValueError, match=">= 0"):
        NoiseCache(-1)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("budget", [0, 1 << 22])
def test_members_then_the_update_through_the_cache_give_the_same_bytes(distribution: str, budget: int) -> None:
    noise = NoiseConfig("dense", distribution)
    shapes = [(15, 20), (1, 7), (280, 250)]
    plain, cached = state_of(shapes), state_of(shapes)
    cache = NoiseCache(budget)
    members = population(21, 3, 6, antithetic=True)
    for member in members:  # what a worker's evaluation draws first
        expected = list(update.member_deltas(plain, member, 40_000_003, noise))
        got = list(update.member_deltas(cached, member, 40_000_003, noise, cache))
        assert all(i == j and s == t and torch.equal(a, b) for (i, s, a), (j, t, b) in zip(expected, got))
    change = update.IterationUpdate(members, (70_001, -3, 123_456_789, 0, -5_000_000, 42))
    update.apply_iteration_(plain, change, noise)
    update.apply_iteration_(cached, change, noise, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(plain.q, cached.q))
    assert (cache.bytes_held > 0) == (budget > 0)


def test_lowrank_factors_hit_per_seed_and_come_out_as_drawn_together() -> None:
    cache = NoiseCache(1 << 20)
    part = cache.factors([11, 12], 3, 40, 24, 2, "cpu")  # what one worker evaluated
    whole = cache.factors([13, 11, 14, 12], 3, 40, 24, 2, "cpu")  # what the update needs: two hits, two drawn
    assert all(torch.equal(x, y) for x, y in zip(whole, population_factors([13, 11, 14, 12], 3, 40, 24, 2)))
    assert all(torch.equal(x, y) for x, y in zip(part, population_factors([11, 12], 3, 40, 24, 2)))
    assert cache.bytes_held == 4 * (40 + 24) * 2  # int8, each seed once
    assert not torch.equal(cache.factors([11], 4, 40, 24, 2, "cpu")[0], whole[0][1:2])  # another matrix, another draw


@pytest.mark.parametrize("budget", [0, 150, 1 << 22])  # none, some seeds evicted, all held
def test_lowrank_members_then_the_update_through_the_cache_give_the_same_bytes(budget: int) -> None:
    noise = NoiseConfig("lowrank", rank=2)
    specs = (TensorSpec("a", (30, 20), 38, "lowrank"), TensorSpec("b", (7,), 36, "dense"), TensorSpec("c", (9, 30), 40, "lowrank"))
    plain = MasterState(specs, tuple((torch.arange(s.numel, dtype=torch.int64).view(s.shape) * 7_919 - 5).to(Q_DTYPE) for s in specs))
    cached = plain.clone()
    cache = NoiseCache(budget)
    members = population(8, 4, 8, antithetic=True)
    for index, spec in enumerate(specs):  # one worker's batch: half of the population
        if spec.treatment == "lowrank":
            cache.factors([m.seed for m in members[:4:2]], index, *spec.shape, noise.rank, "cpu")
    change = update.IterationUpdate(members, (9_001, -3, 123_456_789, 0, -5_000_000, 42, 7, -7))
    update.apply_iteration_(plain, change, noise)
    update.apply_iteration_(cached, change, noise, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(plain.q, cached.q))
