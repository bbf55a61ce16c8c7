"""A bounded cache of dense noise: a worker draws each seed's noise once per iteration."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from swarmtune.noise import dense_noise_map, noise_alphabet


class NoiseCache:
    """Dense noise E (int8 ±1 or int16 table Gaussian) of recently drawn (seed, tensors), up to
    `budget_bytes`, oldest evicted first.

    Evaluating a member draws its seed's noise; its antithetic twin and the iteration's update need
    the same draw again. Noise is a pure function of its key, so a hit is exactly a regeneration.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the noise cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self._bytes = 0

    def noise(self, seed: int, tensors: Sequence[tuple[int, int]], distribution: str, device: torch.device | str) -> torch.Tensor:
        """The dense noise of `tensors` ((index, numel) pairs) for `seed`, concatenated."""
        key = (seed, tuple(tensors), distribution, str(torch.device(device)))
        held = self._held.get(key)
        if held is not None:
            return held
        drawn = dense_noise_map(seed, tensors, distribution, noise_alphabet(distribution, device))
        size = drawn.numel() * drawn.element_size()
        if size <= self.budget_bytes:
            while self._bytes + size > self.budget_bytes:
                _, evicted = self._held.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
            self._held[key] = drawn
            self._bytes += size
        return drawn

    @property
    def bytes_held(self) -> int:
        return self._bytes
