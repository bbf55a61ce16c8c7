"""The exact ES update: ΔQ = Σ_i c_i·E_i in integers, dense or as one exact GEMM per matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import FixedPointOverflow, check_range, rne_shift
from swarmtune.noise import GAUSSIAN_SCALE_BITS, NoiseConfig, dense_noise_map, noise_alphabet, noise_bound, population_factors
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise
from swarmtune.shaping import COEFFICIENT_BITS
from swarmtune.state import MasterState

# 1/√r of the low-rank noise, as the integer round_half_even(2^16 / √r).
LOWRANK_SCALE_BITS = 16
# Anchored decay strength λ is recorded as round_half_even(λ · 2^DECAY_BITS).
DECAY_BITS = 24
# Dense tensors up to this many elements are generated together, one pass per rounding shift.
SMALL_TENSOR = 1 << 16
# float64 represents every integer below 2^53, so a GEMM whose every partial sum stays below is exact.
FLOAT64_EXACT_BITS = 53


@dataclass(frozen=True)
class IterationUpdate:
    """What replay needs of one iteration: its members and their integer coefficients."""

    members: tuple[MemberNoise, ...]
    coefficients: tuple[int, ...]


def lowrank_scale(rank: int) -> int:
    return round(float(1 << LOWRANK_SCALE_BITS) / math.sqrt(rank))


def decay_integer(strength: float) -> int:
    return round(strength * float(1 << DECAY_BITS))


def noise_scale_bits(spec: TensorSpec, noise: NoiseConfig) -> int:
    """Fractional bits of one noise element of this tensor (so ΔQ = Σ k·E >> (C + bits - F))."""
    if spec.treatment == "lowrank":
        return LOWRANK_SCALE_BITS
    return GAUSSIAN_SCALE_BITS if noise.distribution == "gaussian" else 0


def seed_weights(members: Sequence[MemberNoise], coefficients: Sequence[int]) -> dict[int, int]:
    """Σ sign·c per seed: antithetic pairs share one noise draw, so combine them exactly first."""
    if len(members) != len(coefficients):
        raise ValueError(f"{len(members)} members but {len(coefficients)} coefficients")
    weights: dict[int, int] = {}
    for member, coefficient in zip(members, coefficients):
        weights[member.seed] = weights.get(member.seed, 0) + member.sign * coefficient
    return {seed: weight for seed, weight in weights.items() if weight != 0}


def exact_outer_sum(weights: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j·a[:, j]·b[:, j]ᵀ for int64 w and ±1 factors, exactly, via float64 GEMMs on limbs of w."""
    k = weights.numel()
    if k == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.int64, device=a.device)
    largest = int(weights.abs().max().item())
    if largest * k >= 1 << 62:
        raise FixedPointOverflow(f"low-rank update of {k} terms with coefficients up to {largest} exceeds int64")
    bt = b.to(torch.float64).t()
    limb_bits = FLOAT64_EXACT_BITS - 1 - max(1, (k - 1).bit_length())
    total: torch.Tensor | None = None
    remaining, shift = weights, 0
    while True:
        if int(remaining.abs().max().item()) * k < 1 << (FLOAT64_EXACT_BITS - 1):
            limb, last = remaining, True
        else:
            limb, last = remaining & ((1 << limb_bits) - 1), False
        part = ((a.to(torch.float64) * limb.to(torch.float64)) @ bt).to(torch.int64)
        total = part if total is None else total.add_(part.bitwise_left_shift_(shift))
        if last:
            return total
        remaining, shift = remaining >> limb_bits, shift + limb_bits


def dense_shift(spec: TensorSpec, noise: NoiseConfig) -> int:
    """The rounding shift C + bits - F of a tensor's update."""
    return COEFFICIENT_BITS + noise_scale_bits(spec, noise) - spec.exponent


def tensor_delta(
    spec: TensorSpec,
    tensor_index: int,
    weights: Mapping[int, int],
    noise: NoiseConfig,
    device: torch.device,
    cache: NoiseCache | None = None,
) -> torch.Tensor:
    """round_half_even(Σ_seed w_seed·E_seed / 2^(C + bits - F)) for one tensor, int64, flat."""
    shift = dense_shift(spec, noise)
    if not weights:  # every coefficient zero (e.g. all rewards tied): no noise to draw, ΔQ = 0
        return torch.zeros(spec.numel, dtype=torch.int64, device=device)
    if spec.treatment == "lowrank":
        out_features, in_features = spec.shape
        seeds = list(weights)
        # Columns seed-major, then rank: A is out × (seeds·r), B is in × (seeds·r).
        a, b = (cache.factors if cache is not None else population_factors)(seeds, tensor_index, out_features, in_features, noise.rank, device)
        a = a.permute(1, 0, 2).reshape(out_features, -1)
        b = b.permute(1, 0, 2).reshape(in_features, -1)
        scale = lowrank_scale(noise.rank)
        w = torch.tensor([weights[s] * scale for s in seeds for _ in range(noise.rank)], dtype=torch.int64, device=device)
        return rne_shift(exact_outer_sum(w, a, b), shift).view(-1)
    return dense_delta([(tensor_index, spec.numel)], weights, noise.distribution, shift, device, cache)


def dense_delta(
    tensors: Sequence[tuple[int, int]],
    weights: Mapping[int, int],
    distribution: str,
    shift: int,
    device: torch.device,
    cache: NoiseCache | None = None,
) -> torch.Tensor:
    """round_half_even(Σ_seed w_seed·E_seed / 2^shift) of dense `tensors` ((index, numel) pairs), concatenated."""
    # rne_shift needs |x| <= 2^62; bounding the sum up front also keeps it from wrapping int64.
    if sum(abs(w) for w in weights.values()) * noise_bound(distribution) > 1 << 62:
        raise FixedPointOverflow(f"dense update of {len(weights)} seeds with coefficients up to {max(map(abs, weights.values()))} exceeds int64")
    if not weights:
        return torch.zeros(sum(numel for _, numel in tensors), dtype=torch.int64, device=device)
    # mapped_noise hands f a fresh int64 tensor, so f may work in place.
    if len(weights) == 1:  # one member's perturbation: the rounding is elementwise too
        ((seed, weight),) = weights.items()
        return mapped_noise(seed, tensors, distribution, device, lambda e: rne_shift(e.mul_(weight), shift), cache)
    total: torch.Tensor | None = None
    for seed, weight in weights.items():
        term = mapped_noise(seed, tensors, distribution, device, lambda e: e.mul_(weight), cache)
        total = term if total is None else total.add_(term)
    assert total is not None
    return rne_shift(total, shift)


def mapped_noise(
    seed: int,
    tensors: Sequence[tuple[int, int]],
    distribution: str,
    device: torch.device,
    f: Callable[[torch.Tensor], torch.Tensor],
    cache: NoiseCache | None = None,
) -> torch.Tensor:
    """f(E) for an elementwise integer map f of the dense noise E (a fresh int64 tensor f may change in
    place) of `tensors`, concatenated.
    Drawn afresh, f maps the noise alphabet (2 or 65,536 values) instead of the elements when there
    are more elements; from a cache (E drawn once for every use in an iteration), f maps E itself."""
    if cache is not None:
        return f(cache.noise(seed, tensors, distribution, device).to(torch.int64))
    alphabet = noise_alphabet(distribution, device)
    if sum(numel for _, numel in tensors) > alphabet.numel():
        return dense_noise_map(seed, tensors, distribution, f(alphabet.to(torch.int64)))
    return f(dense_noise_map(seed, tensors, distribution, alphabet).to(torch.int64))


def state_deltas(
    state: MasterState, weights: Mapping[int, int], noise: NoiseConfig, cache: NoiseCache | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, flat ΔQ) of every tensor that moves, in order: tensor_delta's values, with the small dense
    tensors of each rounding shift generated together (for them, per-call overhead is the cost)."""
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for index, (spec, q) in enumerate(zip(state.specs, state.q)):
        if spec.treatment == "dense" and spec.numel <= SMALL_TENSOR:
            groups.setdefault((dense_shift(spec, noise), q.device), []).append(index)
    small: dict[int, torch.Tensor] = {}
    for (shift, device), indices in groups.items():
        tensors = [(index, state.specs[index].numel) for index in indices]
        flat = dense_delta(tensors, weights, noise.distribution, shift, device, cache)
        small.update(zip(indices, flat.split([numel for _, numel in tensors])))
    for index, (spec, q) in enumerate(zip(state.specs, state.q)):
        if spec.treatment != "frozen":
            yield index, small.pop(index) if index in small else tensor_delta(spec, index, weights, noise, q.device, cache)


def apply_iteration_(
    state: MasterState,
    update: IterationUpdate,
    noise: NoiseConfig,
    base: MasterState | None = None,
    decay: int = 0,
    cache: NoiseCache | None = None,
) -> None:
    """Q <- Q + ΔQ - round_half_even((Q - Q_base)·decay / 2^24), in place, tensor by tensor.

    On FixedPointOverflow the state is partly updated (the failing tensor too): rebuild it.
    """
    if decay and base is None:
        raise ValueError("anchored decay needs the base state")
    weights = seed_weights(update.members, update.coefficients)
    for index, delta in state_deltas(state, weights, noise, cache):
        spec, q = state.specs[index], state.q[index]
        delta = delta.view(q.shape)
        if decay:
            assert base is not None
            drift = q - base.q[index].to(q.device)
            if drift.numel() and int(drift.abs().max().item()) * decay >= 1 << 62:
                raise FixedPointOverflow(f"anchored decay of {spec.name!r} would overflow int64")
            delta = delta - rne_shift(drift * decay, DECAY_BITS)
        check_range(q.add_(delta), spec.name)  # cannot wrap: |Q| < 2^53, |ΔQ| <= 2^62 + 2^38


def member_deltas(
    state: MasterState, member: MemberNoise, sigma: int, noise: NoiseConfig, cache: NoiseCache | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, integer perturbation σ·sign·E shaped like the tensor) of every tensor a member moves."""
    for index, delta in state_deltas(state, {member.seed: member.sign * sigma}, noise, cache):
        yield index, delta.view(state.specs[index].shape)
