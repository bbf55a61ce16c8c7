"""Fitness shaping: signed rewards -> shaped scores -> the integer coefficients the ledger records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

SHAPING_VERSION = "swarmtune-shaping/1"
SHAPING_METHODS = ("zscore", "centered_rank")

# Coefficients are integers in units of 2**-COEFFICIENT_BITS of a weight (PROTOCOL §3).
COEFFICIENT_BITS = 40
# Same epsilon as Qiu et al.'s (r - mean) / (std + 1e-8).
ZSCORE_EPSILON = 1e-8


def zscore(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / (std + 1e-8), std with Bessel's correction; sums are math.fsum (exactly rounded)."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    mean = math.fsum(rewards) / n
    # numpy's float64 -, * and / are the IEEE operations Python's floats do, one element at a time.
    with np.errstate(all="ignore"):  # an overflow gives inf, as Python's floats do
        deviations = np.asarray(rewards, dtype=np.float64) - mean
        variance = math.fsum((deviations * deviations).tolist()) / (n - 1)
        spread = math.sqrt(variance) + ZSCORE_EPSILON
        return (deviations / spread).tolist()


def centered_ranks(rewards: Sequence[float]) -> list[float]:
    """Rank in [0, n-1] (ties share their mean rank), mapped to rank / (n - 1) - 0.5."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    order = sorted(range(n), key=lambda i: rewards[i])
    ranks = [0.0] * n
    start = 0
    while start < n:
        stop = start
        while stop + 1 < n and rewards[order[stop + 1]] == rewards[order[start]]:
            stop += 1
        for position in range(start, stop + 1):
            ranks[order[position]] = (start + stop) / 2
        start = stop + 1
    return [rank / (n - 1) - 0.5 for rank in ranks]


def shape(rewards: Sequence[float], method: str) -> list[float]:
    if not all(map(math.isfinite, rewards)):
        bad = next(r for r in rewards if not math.isfinite(r))
        raise ValueError(f"reward {bad!r} is not finite; it must be rejected before shaping")
    if method == "zscore":
        return zscore(rewards)
    if method == "centered_rank":
        return centered_ranks(rewards)
    raise ValueError(f"unknown shaping method {method!r}; use one of {SHAPING_METHODS}")


def quantize(shaped: Sequence[float], alpha: float) -> list[int]:
    """c_i = round_half_even(((alpha · s_i) / n) · 2^COEFFICIENT_BITS), n = len(shaped)."""
    n = len(shaped)
    unit = float(1 << COEFFICIENT_BITS)
    with np.errstate(all="ignore"):
        scaled = ((alpha * np.asarray(shaped, dtype=np.float64)) / n) * unit
    # np.rint rounds half to even, exactly; below 2**62 its integral floats convert to int64 exactly.
    # Anything else (inf, nan, huge) takes Python's round, which raises or gives the big integer.
    if n and np.isfinite(scaled).all() and float(np.abs(scaled).max()) < 2.0**62:
        return np.rint(scaled).astype(np.int64).tolist()
    return [round(x) for x in scaled.tolist()]


def shape_groups(rewards: Sequence[float], groups: Sequence[int], method: str) -> list[float]:
    """`shape` applied to each group's rewards separately (groups[k]: reward k's group), in input order."""
    if len(groups) != len(rewards):
        raise ValueError(f"{len(groups)} group labels for {len(rewards)} rewards; give one label per reward")
    if len(set(groups)) < 2:  # one group (the default): the rewards as they are, no bookkeeping per reward
        return shape(rewards, method)
    positions: dict[int, list[int]] = {}
    for k, group in enumerate(groups):
        positions.setdefault(group, []).append(k)
    shaped = [0.0] * len(rewards)
    for members in positions.values():
        for k, score in zip(members, shape([rewards[k] for k in members], method)):
            shaped[k] = score
    return shaped


def coefficients(
    rewards: Sequence[float], method: str, alpha: float, groups: Sequence[int] | None = None
) -> list[int]:
    """The integer coefficients of one iteration, from its accepted rewards in member order.

    `groups` (one label per reward) shapes each group separately; None is one group. Quantisation's
    n stays the count of all rewards, so the step size does not depend on how members are grouped.
    """
    return quantize(shape_groups(rewards, [0] * len(rewards) if groups is None else groups, method), alpha)


@dataclass(frozen=True)
class Rule:
    """How a job shapes its iterations (its genesis job spec's): the method, α, and the group width W."""

    method: str
    alpha: float
    group_width: int


def member_coefficients(population: int, rewards: Mapping[int, float], rule: Rule) -> tuple[int, ...]:
    """One iteration's coefficients, one per member: the rewarded members' rewards (member -> reward)
    shaped in member order within their groups (member m in group m // W), 0 for the other members."""
    rewarded = sorted(rewards)
    groups = [m // rule.group_width for m in rewarded] if rule.group_width < population else None
    shaped = coefficients([rewards[m] for m in rewarded], rule.method, rule.alpha, groups)
    if len(rewarded) == population:  # every member rewarded (the common case): already in member order
        return tuple(shaped)
    out = [0] * population
    for member, coefficient in zip(rewarded, shaped):
        out[member] = coefficient
    return tuple(out)


def sigma_integer(sigma: float) -> int:
    """σ in the same fixed-point units as the coefficients: round_half_even(σ · 2^COEFFICIENT_BITS)."""
    return round(sigma * float(1 << COEFFICIENT_BITS))
