"""A bounded cache of noise: a worker draws each seed's noise once per iteration."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from swarmtune.noise import dense_noise_map, noise_alphabet, population_factors


class NoiseCache:
    """Dense noise E (int8 ±1 or int16 table Gaussian) of recently drawn (seed, tensors), and low-rank
    ±1 factors of recently drawn (seed, matrix), up to `budget_bytes`, oldest evicted first.

    Evaluating a member draws its seed's noise; its antithetic twin and the iteration's update need
    the same draw again. Noise is a pure function of its key, so a hit is exactly a regeneration.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the noise cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[tuple[object, ...], tuple[torch.Tensor, ...]] = OrderedDict()
        self._bytes = 0

    def noise(
        self, seed: int, tensors: Sequence[tuple[int, int]], distribution: str, device: torch.device | str, start: int = 0
    ) -> torch.Tensor:
        """The dense noise of `tensors` ((index, numel) pairs) for `seed`, concatenated; of one tensor,
        elements start..start+numel (each chunk of a large tensor is its own entry)."""
        key = ("dense", seed, tuple(tensors), start, distribution, str(torch.device(device)))
        held = self._held.get(key)
        if held is not None:
            return held[0]
        drawn = dense_noise_map(seed, tensors, distribution, noise_alphabet(distribution, device), start)
        self._keep(key, (drawn,))
        return drawn

    def factors(
        self, seeds: Sequence[int], tensor_index: int, out_features: int, in_features: int, rank: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """population_factors of distinct `seeds`, each seed's drawn once: a worker evaluates part of the
        population, the update needs all of it, so the seeds missing are drawn together."""
        shape = (tensor_index, out_features, in_features, rank, str(torch.device(device)))
        found = {seed: held for seed in seeds if (held := self._held.get(("lowrank", seed, *shape))) is not None}
        missing = [seed for seed in seeds if seed not in found]
        # No seeds (all coefficients zero) gives empty stacks here, never torch.stack([]).
        a, b = population_factors(missing, tensor_index, out_features, in_features, rank, device)
        for seed, pair in zip(missing, zip(a, b)):
            found[seed] = pair
            self._keep(("lowrank", seed, *shape), (pair[0].clone(), pair[1].clone()))  # not views of the batch
        if len(missing) == len(seeds):
            return a, b
        return torch.stack([found[seed][0] for seed in seeds]), torch.stack([found[seed][1] for seed in seeds])

    def _keep(self, key: tuple[object, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.budget_bytes or key in self._held:
            return
        while self._bytes + size > self.budget_bytes:
            _, evicted = self._held.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in evicted)
        self._held[key] = tensors
        self._bytes += size

    @property
    def bytes_held(self) -> int:
        return self._bytes
