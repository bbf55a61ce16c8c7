"""Retry delays: exponential backoff with full jitter, so reconnecting workers do not stampede."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Attempt n waits a uniform time in [0, min(cap, base·2^n)] seconds (n = 0, 1, ...)."""

    base_s: float = 0.2
    cap_s: float = 10.0

    def ceiling(self, attempt: int) -> float:
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt, 32))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(attempt))
