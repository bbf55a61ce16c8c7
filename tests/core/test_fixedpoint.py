"""Fixed-point conversion, derived weights and round-half-even shifts."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from swarmtune import fixedpoint


@given(st.integers(min_value=-(2**62), max_value=2**62), st.integers(min_value=0, max_value=62))
def test_rne_shift_is_round_half_even(x: int, shift: int) -> None:
    expected = round(Fraction(x, 1 << shift))
    assert fixedpoint.rne_shift(torch.tensor([x]), shift).item() == expected
    assert fixedpoint.rne_shift_int(x, shift) == expected


def test_rne_shift_at_the_ends_of_its_range() -> None:
    x = torch.tensor([2**62, -(2**62), 2**62 - 1, 3 * 2**60, -(3 * 2**60)])
    for shift in (1, 2, 31, 61, 62):
        assert fixedpoint.rne_shift(x, shift).tolist() == [round(Fraction(v, 1 << shift)) for v in x.tolist()]


def test_rne_shift_ties() -> None:
    x = torch.tensor([1, 3, 5, 7, -1, -3, -5, -7, 6, -6])
    assert fixedpoint.rne_shift(x, 1).tolist() == [0, 2, 2, 4, 0, -2, -2, -4, 3, -3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_genesis_round_trip_is_exact_for_ordinary_weights(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = (torch.randn(4096) * 0.05).to(dtype)
    exponent = fixedpoint.choose_exponent(w)
    q = fixedpoint.to_fixed(w, exponent)
    assert q.dtype == fixedpoint.Q_DTYPE and int(q.abs().max()) < 2**fixedpoint.GENESIS_BITS
    derived = fixedpoint.derive(q, exponent, dtype)
    # Weights above 2^-(F - 24) are exact in Q; smaller ones round to the 2^-F grid.
    big = w.float().abs() >= 2.0 ** (24 - exponent)
    assert torch.equal(derived[big], w[big])
    assert (derived.double() - w.double()).abs().max().item() <= 2.0**-exponent


def test_exponent_rules() -> None:
    assert fixedpoint.choose_exponent(torch.zeros(3)) == fixedpoint.EXPONENT_MAX
    assert fixedpoint.choose_exponent(torch.tensor([2.0**-13, -(2.0**-14)])) == fixedpoint.EXPONENT_MAX
    assert fixedpoint.choose_exponent(torch.tensor([0.5, -0.25])) == 28 - 0
    assert fixedpoint.choose_exponent(torch.tensor([3000.0])) == 28 - 12
    assert fixedpoint.choose_exponent(torch.tensor([-3000.0, 1.0], dtype=torch.bfloat16)) == 28 - 12  # sign ignored
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN"):
            fixedpoint.choose_exponent(torch.tensor([1.0, bad]))


def test_derive_is_the_specified_rounding_chain() -> None:
    q = torch.tensor([2**31 - 1, -(2**30) - 3, 123456789, 1], dtype=fixedpoint.Q_DTYPE)
    for exponent in (40, 20, 0):
        expected = [float(Fraction(int(v), 1 << exponent)) for v in q]  # correctly rounded to float64
        f32 = torch.tensor(expected, dtype=torch.float64).to(torch.float32)
        assert torch.equal(fixedpoint.derive(q, exponent, torch.float32), f32)
        assert torch.equal(fixedpoint.derive(q, exponent, torch.bfloat16), f32.to(torch.bfloat16))


def test_overflow_is_reported_with_a_remedy() -> None:
    fixedpoint.check_range(torch.tensor([2**31 - 1, -(2**31) + 1]), "ok")
    for outside in (2**31, -(2**31)):  # -2^31 fits int32 but not the symmetric range
        with pytest.raises(fixedpoint.FixedPointOverflow, match="Lower the job's alpha"):
            fixedpoint.check_range(torch.tensor([0, outside]), "model.layers.0.mlp.up_proj.weight")
