"""Fixed point: base floats to Q·2^-F (int32 at rest, int64 while computing), Q back to derived floats."""

from __future__ import annotations

import math

import torch

# The master state's width at rest (PROTOCOL §2.2): 4 bytes a parameter; arithmetic widens to int64.
Q_DTYPE = torch.int32
# |Q| stays below 2**Q_LIMIT_BITS: every Q fits Q_DTYPE (and float64 holds it exactly on every device).
Q_LIMIT_BITS = 31
# Genesis puts the largest |w| of a tensor below 2**GENESIS_BITS: 8x growth before overflow.
GENESIS_BITS = 28
# Finest resolution: 2**-40 ≈ 9e-13, far below any ES step; also keeps shifts (40 + G - F) non-negative.
EXPONENT_MAX = 40


class FixedPointOverflow(ArithmeticError):
    """A tensor left the fixed-point range; the job's learning rate or decay is out of bounds."""


def choose_exponent(weights: torch.Tensor) -> int:
    """F = min(EXPONENT_MAX, GENESIS_BITS - e) where max|w| < 2^e (e from frexp, exact)."""
    if not weights.numel():
        return EXPONENT_MAX
    # aminmax propagates NaN and keeps infinities, with no tensor-sized temporary (abs, isfinite).
    low, high = (float(v) for v in torch.aminmax(weights.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("base weights contain NaN or infinity; cannot build a fixed-point state")
    largest = max(-low, high)
    if largest == 0.0:
        return EXPONENT_MAX
    _, exponent = math.frexp(largest)
    return min(EXPONENT_MAX, GENESIS_BITS - exponent)


def to_fixed(weights: torch.Tensor, exponent: int) -> torch.Tensor:
    """Q = round_half_even(w · 2^F) as Q_DTYPE: w -> float64 (exact), scale by a power of two (exact),
    round; genesis exponents keep |Q| < 2^GENESIS_BITS, so the narrowing is exact."""
    scaled = weights.detach().to(torch.float64, copy=True)  # a copy: the in-place steps below never touch `weights`
    return scaled.mul_(2.0**exponent).round_().to(Q_DTYPE)


def derive(q: torch.Tensor, exponent: int, dtype: torch.dtype) -> torch.Tensor:
    """Derived weights: Q -> float64 (exact) -> ·2^-F (exact) -> float32 (RNE) -> dtype (RNE)."""
    return q.to(torch.float64).mul_(2.0 ** (-exponent)).to(torch.float32).to(dtype)


def rne_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x / 2^shift rounded half to even, in int64 arithmetic, for |x| <= 2^62 (x may be negative)."""
    if shift < 0 or shift > 62:
        raise ValueError(f"shift must be in [0, 62], got {shift}")
    if shift == 0:
        return x
    # With x = floor·2^s + r (0 <= r < 2^s): x + 2^(s-1) - 1 + (floor & 1) passes the next multiple of
    # 2^s exactly when r is above half, or at half with floor odd. |x| <= 2^62 keeps it in int64.
    out = x >> shift  # arithmetic shift: floor division for negative x too
    out.bitwise_and_(1).add_(x).add_((1 << (shift - 1)) - 1)
    return out.bitwise_right_shift_(shift)


def rne_shift_int(x: int, shift: int) -> int:
    """Python-integer twin of rne_shift, for coefficients and tests."""
    if shift == 0:
        return x
    floor = x >> shift
    remainder = x - (floor << shift)
    half = 1 << (shift - 1)
    return floor + (remainder > half or (remainder == half and floor & 1 == 1))


def check_range(q: torch.Tensor, name: str) -> None:
    """Raise FixedPointOverflow if any |Q| of a candidate (int64, or float64 holding integers) reaches
    2^Q_LIMIT_BITS (before it is narrowed to Q_DTYPE, where it would wrap)."""
    if not q.numel():
        return
    low, high = q.aminmax()  # one pass over q, not two
    if max(-int(low), int(high)) >= 1 << Q_LIMIT_BITS:
        raise FixedPointOverflow(
            f"tensor {name!r} left the fixed-point range (|Q| ≥ 2^{Q_LIMIT_BITS}): its weights grew more "
            "than 8x from the base model. Lower the job's alpha or raise its weight decay toward the base."
        )
