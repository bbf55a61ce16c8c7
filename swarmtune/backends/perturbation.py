"""A member's exact perturbation, the same for every backend: weights or low-rank factors from the integer master."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from swarmtune.fixedpoint import derive
from swarmtune.noise import NoiseConfig, population_factors
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise
from swarmtune.shaping import COEFFICIENT_BITS
from swarmtune.state import MasterState
from swarmtune.update import LOWRANK_SCALE_BITS, lowrank_scale, member_deltas


@dataclass(frozen=True)
class LowRankDelta:
    """One Linear's population perturbation: rows of member i get (x·B_i)·A_iᵀ added to the output.

    b_t is B transposed (members, r, in); a_t is A transposed (members, r, out) with sign·σ_eff
    folded in; both in the model's dtype.
    """

    module: str
    b_t: torch.Tensor
    a_t: torch.Tensor

    def members(self, start: int, stop: int) -> LowRankDelta:
        return LowRankDelta(self.module, self.b_t[start:stop], self.a_t[start:stop])


def perturbed_weights(
    state: MasterState,
    member: MemberNoise,
    sigma_int: int,
    noise: NoiseConfig,
    dtype: torch.dtype,
    cache: NoiseCache | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(index, start, derive(Q + integer perturbation) of flat elements start..) of each tensor a member
    moves, chunk by chunk on `device`: its weights come from the master, never from a float add."""
    for index, start, delta in member_deltas(state, member, sigma_int, noise, cache, device):
        delta.add_(state.run(index, start, start + delta.numel()).to(delta.device))
        yield index, start, derive(delta, state.specs[index].exponent, dtype)
        del delta  # not alive while the next chunk is drawn


def lowrank_sigma(sigma_int: int, rank: int) -> float:
    """σ_eff with ΔW = σ_eff·A·Bᵀ: the integer σ and 1/√r scale of the materialised perturbation."""
    return sigma_int * lowrank_scale(rank) * 2.0 ** -(COEFFICIENT_BITS + LOWRANK_SCALE_BITS)


def lowrank_deltas(
    state: MasterState,
    members: Sequence[MemberNoise],
    sigma_int: int,
    noise: NoiseConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    cache: NoiseCache | None = None,
) -> list[LowRankDelta]:
    """The factor stacks of every low-rank tensor for a population (antithetic pairs share a draw;
    `cache` keeps them for the update)."""
    seeds = list(dict.fromkeys(m.seed for m in members))
    draw = torch.tensor([seeds.index(m.seed) for m in members], device=device)
    signs = torch.tensor([m.sign for m in members], dtype=torch.float64, device=device)
    scales = (signs * lowrank_sigma(sigma_int, noise.rank)).view(-1, 1, 1)
    deltas = []
    for index, spec in enumerate(state.specs):
        if spec.treatment != "lowrank":
            continue
        a, b = (cache.factors if cache is not None else population_factors)(seeds, index, spec.shape[0], spec.shape[1], noise.rank, device)
        a_t = (a[draw].transpose(1, 2).to(torch.float64) * scales).to(dtype)
        b_t = b[draw].transpose(1, 2).to(dtype).contiguous()
        deltas.append(LowRankDelta(spec.name.removesuffix(".weight"), b_t, a_t))
    return deltas


def uses_lowrank_batching(state: MasterState) -> bool:
    """True when every perturbed tensor is low-rank, so no member needs materialised weights."""
    treatments = {spec.treatment for spec in state.specs} - {"frozen"}
    return treatments == {"lowrank"}
