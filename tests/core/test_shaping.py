"""Fitness shaping and coefficient quantization."""

from __future__ import annotations

import math

import pytest
import torch

from swarmtune import shaping


def test_zscore_matches_the_paper_formula() -> None:
    rewards = [0.0, 1.0, 1.0, 0.5, 0.25, 0.0, 1.0]
    t = torch.tensor(rewards, dtype=torch.float64)
    paper = ((t - t.mean()) / (t.std() + 1e-8)).tolist()
    assert shaping.zscore(rewards) == pytest.approx(paper, abs=1e-12)


def test_constant_rewards_give_zero_coefficients() -> None:
    assert shaping.coefficients([0.5] * 30, "zscore", 5e-4) == [0] * 30
    assert shaping.coefficients([0.5] * 30, "centered_rank", 5e-4) == [0] * 30


def test_centered_ranks_with_ties() -> None:
    assert shaping.centered_ranks([3.0, 1.0, 2.0]) == [0.5, -0.5, 0.0]
    assert shaping.centered_ranks([1.0, 1.0, 0.0, 2.0]) == pytest.approx([0.0, 0.0, -0.5, 0.5])


def test_quantization_is_round_half_even_of_the_specified_expression() -> None:
    shaped = [1.0, -0.75, 0.3]
    alpha = 5e-4
    expected = [round(((alpha * s) / 3) * 2.0**40) for s in shaped]
    assert shaping.quantize(shaped, alpha) == expected
    assert abs(expected[0] / 2**40 - alpha / 3) < 2**-40


def test_non_finite_rewards_are_refused() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not finite"):
            shaping.coefficients([0.0, bad], "zscore", 1e-3)
    with pytest.raises(ValueError, match="unknown shaping"):
        shaping.coefficients([0.0, 1.0], "softmax", 1e-3)
