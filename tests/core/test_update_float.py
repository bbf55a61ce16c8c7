"""The float64 route of the low-rank update gives the int64 route's integers, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmtune import update
from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import Q_DTYPE, FixedPointOverflow, rne_shift
from swarmtune.noise import NoiseConfig
from swarmtune.seeds import MemberNoise
from swarmtune.state import MasterState
from tests.support import spec_reference as ref

# The float route takes Σ|w| < 2^52; these straddle that line and the int64 limit of the int route.
WEIGHT_BITS = st.integers(min_value=0, max_value=59)


def integer_route(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shift: int) -> torch.Tensor:
    return rne_shift(update.exact_outer_sum(w, a, b), shift)


def float_route(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shift: int) -> torch.Tensor:
    return update.rounded_outer_sum(update.scaled_weights(w, shift), a, b.to(torch.float64).t())


def signs(generator: torch.Generator, rows: int, k: int) -> torch.Tensor:
    return torch.randint(0, 2, (rows, k), generator=generator, dtype=torch.int8) * 2 - 1


@settings(max_examples=120, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    k=st.integers(1, 16),
    shift=st.integers(0, 62),
    bits=WEIGHT_BITS,
    seed=st.integers(0, 2**32 - 1),
)
def test_float_route_equals_integer_route(rows: int, cols: int, k: int, shift: int, bits: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randint(-(1 << bits), (1 << bits) + 1, (k,), generator=generator, dtype=torch.int64)
    if int(w.abs().max()) * k >= 1 << 52:
        w = w >> (int(w.abs().max()).bit_length() + (k - 1).bit_length() - 52)  # into the float route's range
    a, b = signs(generator, rows, k), signs(generator, cols, k)
    got = float_route(w, a, b, shift)
    assert got.dtype == torch.float64
    assert torch.equal(got.to(torch.int64), integer_route(w, a, b, shift))


@pytest.mark.parametrize("shift", [1, 2, 22, 40])
def test_ties_round_to_even_like_the_integer_route(shift: int) -> None:
    # w_j = (2m+1)·2^(s-1): each single term is a tie, at odd and even quotients, of both signs.
    odd = torch.tensor([1, 3, 5, 7, -1, -3, -5, -7], dtype=torch.int64)
    w = odd << (shift - 1)
    a = torch.eye(w.numel(), dtype=torch.int8)
    b = torch.eye(w.numel(), dtype=torch.int8)
    got = float_route(w, a, b, shift).diagonal().to(torch.int64)
    assert torch.equal(got, integer_route(w, a, b, shift).diagonal())
    assert got.tolist() == [ref.rne(int(v), shift) for v in w]


def lowrank_state(shape: tuple[int, int], exponent: int) -> MasterState:
    q = torch.arange(shape[0] * shape[1], dtype=torch.int64).view(shape).mul_(7_919).sub_(3).to(Q_DTYPE)
    return MasterState((TensorSpec("w", shape, exponent, "lowrank"),), (q,))


@pytest.mark.parametrize("coefficient", [3 << 30, (1 << 52) // 4 // update.lowrank_scale(2) - 1, (1 << 52) // 4 // update.lowrank_scale(2) + 1, (1 << 42) - 1])
def test_both_sides_of_the_limb_line_match_the_reference(coefficient: int) -> None:
    # Two seeds · rank 2 = 4 columns; scale·coefficient·4 below or above 2^52 picks the route.
    noise = NoiseConfig("lowrank", rank=2)
    spec = TensorSpec("w", (9, 5), 8, "lowrank")  # a coarse grid: large coefficients stay in range
    weights = {11: coefficient, 12: -coefficient + 1}
    chunks = [delta for _, _, delta in update.tensor_deltas(spec, 0, weights, noise, "cpu")]
    limbs = coefficient * update.lowrank_scale(2) * 4 >= 1 << 52
    assert all(chunk.dtype == (torch.int64 if limbs else torch.float64) for chunk in chunks)
    assert torch.cat(chunks).to(torch.int64).tolist() == ref.lowrank_delta(weights, 0, 9, 5, 2, 8)


def test_float_route_with_decay_and_overflow_like_the_integer_one() -> None:
    noise = NoiseConfig("lowrank", rank=1)
    members = (MemberNoise(0, 5, 1), MemberNoise(1, 5, -1), MemberNoise(2, 6, 1))
    coefficients = (1 << 33, -(1 << 31), 12_345)
    state, base = lowrank_state((7, 3), 20), lowrank_state((7, 3), 20)
    state.q[0].add_(1_000_003)
    before = state.q[0].flatten().tolist()
    drift = [s - b for s, b in zip(before, base.q[0].flatten().tolist())]
    weights = update.seed_weights(members, coefficients)
    delta = ref.lowrank_delta(weights, 0, 7, 3, 1, 20)
    decay = update.decay_integer(0.01)
    update.apply_iteration_(state, update.IterationUpdate(members, coefficients), noise, base, decay)
    assert state.q[0].flatten().tolist() == [s + d - ref.rne(x * decay, 24) for s, d, x in zip(before, delta, drift)]
    fine = lowrank_state((7, 3), 40)  # s = 16: ΔQ = ±2^33 on every element, on the float route
    with pytest.raises(FixedPointOverflow, match="'w' left the fixed-point range"):
        update.apply_iteration_(fine, update.IterationUpdate(members[:1], (1 << 33,)), noise)
