"""shaping's array arithmetic gives exactly the coefficients of PROTOCOL §3's scalar formulas."""

from __future__ import annotations

import math
import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmtune import shaping


def scalar_zscore(rewards: list[float]) -> list[float]:
    """§3 one float at a time: (r - mean) / (std + 1e-8), sums by math.fsum."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    mean = math.fsum(rewards) / n
    deviations = [r - mean for r in rewards]
    spread = math.sqrt(math.fsum(map(operator.mul, deviations, deviations)) / (n - 1)) + shaping.ZSCORE_EPSILON
    return [d / spread for d in deviations]


def scalar_quantize(shaped: list[float], alpha: float) -> list[int]:
    return [round(((alpha * s) / len(shaped)) * 2.0**shaping.COEFFICIENT_BITS) for s in shaped]


rewards_lists = st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6), min_size=0, max_size=300)


@settings(max_examples=300, deadline=None)
@given(rewards_lists, st.floats(min_value=1e-9, max_value=10.0))
def test_zscore_and_quantize_are_the_scalar_formulas_bit_for_bit(rewards: list[float], alpha: float) -> None:
    shaped = shaping.zscore(rewards)
    assert [x.hex() for x in shaped] == [x.hex() for x in scalar_zscore(rewards)]
    assert shaping.quantize(shaped, alpha) == scalar_quantize(shaped, alpha)


def test_quantize_rounds_exact_halves_to_even_and_keeps_huge_values_exact() -> None:
    halves = [(j + 0.5) * 2.0**-37 for j in range(-4, 4)]  # s / 8 * 2**40 = j + 0.5 exactly
    assert shaping.quantize(halves, 1.0) == scalar_quantize(halves, 1.0) == [-4, -2, -2, 0, 0, 2, 2, 4]
    huge = [1e30, -3e25, 0.5]  # beyond int64: Python's integers, exactly
    assert shaping.quantize(huge, 1.0) == scalar_quantize(huge, 1.0)
    for bad in (math.inf, math.nan):
        with pytest.raises((OverflowError, ValueError)):
            shaping.quantize([0.0, bad], 1.0)
