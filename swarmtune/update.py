"""The exact ES update: ΔQ = Σ_i c_i·E_i in int64, chunk by chunk (dense, or exact GEMMs by row block)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch

from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import FixedPointOverflow, check_range, rne_shift
from swarmtune.noise import GAUSSIAN_SCALE_BITS, NoiseConfig, dense_noise_map, noise_alphabet, noise_bound, population_factors
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise
from swarmtune.shaping import COEFFICIENT_BITS
from swarmtune.state import MasterState, row_chunks

# 1/√r of the low-rank noise, as the integer round_half_even(2^16 / √r).
LOWRANK_SCALE_BITS = 16
# Anchored decay strength λ is recorded as round_half_even(λ · 2^DECAY_BITS).
DECAY_BITS = 24
# Dense tensors up to this many elements are generated together, one pass per rounding shift.
SMALL_TENSOR = 1 << 16
# float64 represents every integer below 2^53, so a GEMM whose every partial sum stays below is exact.
FLOAT64_EXACT_BITS = 53


class BaseSource(Protocol):
    """Where anchored decay reads the genesis Q: a MasterState, or a spill file (spillfile.SpillFile)."""

    def read(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Flat elements start..stop of tensor `index` as Q_DTYPE or int64."""
        ...


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


def tensor_deltas(
    spec: TensorSpec,
    tensor_index: int,
    weights: Mapping[int, int],
    noise: NoiseConfig,
    device: torch.device | str,
    cache: NoiseCache | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(tensor_index, start, round_half_even(Σ_seed w_seed·E_seed / 2^(C + bits - F)) of elements
    start..) for one tensor, flat, by the row runs of state.row_chunks: no temporary is tensor-sized.
    int64, except a low-rank ΔQ without limbs: float64 holding the same integers (below 2^52), exactly."""
    shift = dense_shift(spec, noise)
    chunks = row_chunks(spec.shape)
    # Each chunk is yielded unnamed: a name here would keep it alive while the next one is computed.
    if not weights:  # every coefficient zero (e.g. all rewards tied): no noise to draw, ΔQ = 0
        for start, stop in chunks:
            yield tensor_index, start, torch.zeros(stop - start, dtype=torch.int64, device=device)
        return
    if spec.treatment != "lowrank":
        for start, stop in chunks:
            yield tensor_index, start, dense_delta([(tensor_index, stop - start)], weights, noise.distribution, shift, device, cache, start)
        return
    out_features, in_features = spec.shape
    seeds = list(weights)
    # Columns seed-major, then rank: A is out × (seeds·r), B is in × (seeds·r); the ΔQ of a row block
    # is A[rows]·diag(w)·Bᵀ, the same exact sum as the whole matrix's rows.
    a, b = (cache.factors if cache is not None else population_factors)(seeds, tensor_index, out_features, in_features, noise.rank, device)
    a = a.permute(1, 0, 2).reshape(out_features, -1)
    b = b.permute(1, 0, 2).reshape(in_features, -1)
    scale = lowrank_scale(noise.rank)
    w = torch.tensor([weights[s] * scale for s in seeds for _ in range(noise.rank)], dtype=torch.int64, device=device)
    if int(w.abs().max().item()) * w.numel() >= 1 << (FLOAT64_EXACT_BITS - 1):  # limbs: the int64 route
        for start, stop in chunks:
            yield tensor_index, start, rne_shift(exact_outer_sum(w, a[start // in_features : stop // in_features], b), shift).view(-1)
        return
    scaled, bt = scaled_weights(w, shift), b.to(torch.float64).t()
    for start, stop in chunks:
        yield tensor_index, start, rounded_outer_sum(scaled, a[start // in_features : stop // in_features], bt).view(-1)


def scaled_weights(weights: torch.Tensor, shift: int) -> torch.Tensor:
    """w·2^-shift in float64, exactly (|w| < 2^53; a power-of-two scaling cannot underflow at shift <= 62)."""
    if shift < 0 or shift > 62:
        raise ValueError(f"shift must be in [0, 62], got {shift}")
    return weights.to(torch.float64).mul_(2.0**-shift)


def rounded_outer_sum(scaled: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """round_half_even(Σ_j w_j·a[:, j]·bt[j, :] / 2^s) as float64 holding integers, for ±1 factors and
    scaled = w·2^-s with Σ|w| < 2^52: every partial sum is a multiple of 2^-s below 2^(52-s) in
    magnitude, so float64 holds it exactly whatever the order (FMA included), and round is IEEE
    round-half-even (PROTOCOL §4, implementation note)."""
    return ((a.to(torch.float64) * scaled) @ bt).round_()


def dense_delta(
    tensors: Sequence[tuple[int, int]],
    weights: Mapping[int, int],
    distribution: str,
    shift: int,
    device: torch.device | str,
    cache: NoiseCache | None = None,
    start: int = 0,
) -> torch.Tensor:
    """round_half_even(Σ_seed w_seed·E_seed / 2^shift) of dense `tensors` ((index, numel) pairs),
    concatenated; of one tensor, its elements start..start+numel."""
    # rne_shift needs |x| <= 2^62; bounding the sum up front also keeps it from wrapping int64.
    if sum(abs(w) for w in weights.values()) * noise_bound(distribution) > 1 << 62:
        raise FixedPointOverflow(f"dense update of {len(weights)} seeds with coefficients up to {max(map(abs, weights.values()))} exceeds int64")
    if not weights:
        return torch.zeros(sum(numel for _, numel in tensors), dtype=torch.int64, device=device)
    # mapped_noise hands f a fresh int64 tensor, so f may work in place.
    if len(weights) == 1:  # one member's perturbation: the rounding is elementwise too
        ((seed, weight),) = weights.items()
        return mapped_noise(seed, tensors, distribution, device, lambda e: rne_shift(e.mul_(weight), shift), cache, start)
    total: torch.Tensor | None = None
    for seed, weight in weights.items():
        term = mapped_noise(seed, tensors, distribution, device, lambda e: e.mul_(weight), cache, start)
        total = term if total is None else total.add_(term)
    assert total is not None
    return rne_shift(total, shift)


def mapped_noise(
    seed: int,
    tensors: Sequence[tuple[int, int]],
    distribution: str,
    device: torch.device | str,
    f: Callable[[torch.Tensor], torch.Tensor],
    cache: NoiseCache | None = None,
    start: int = 0,
) -> torch.Tensor:
    """f(E) for an elementwise integer map f of the dense noise E (a fresh int64 tensor f may change in
    place) of `tensors` (of one tensor: its elements from `start`), concatenated.
    Drawn afresh, f maps the noise alphabet (2 or 65,536 values) instead of the elements when there
    are more elements; from a cache (E drawn once for every use in an iteration), f maps E itself."""
    if cache is not None:
        return f(cache.noise(seed, tensors, distribution, device, start).to(torch.int64))
    alphabet = noise_alphabet(distribution, device)
    if sum(numel for _, numel in tensors) > alphabet.numel():
        return dense_noise_map(seed, tensors, distribution, f(alphabet.to(torch.int64)), start)
    return f(dense_noise_map(seed, tensors, distribution, alphabet, start).to(torch.int64))


def state_deltas(
    state: MasterState,
    weights: Mapping[int, int],
    noise: NoiseConfig,
    cache: NoiseCache | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(index, start, flat int64 ΔQ of elements start..) of every tensor that moves, in order, computed
    on `device` (default: where Q lives): tensor_deltas' values, with the small dense tensors of each
    rounding shift generated together (for them, per-call overhead is the cost)."""
    where = torch.device(device) if device is not None else state.device
    groups: dict[int, list[int]] = {}
    for index, spec in enumerate(state.specs):
        if spec.treatment == "dense" and spec.numel <= SMALL_TENSOR:
            groups.setdefault(dense_shift(spec, noise), []).append(index)
    small: dict[int, torch.Tensor] = {}
    for shift, indices in groups.items():
        tensors = [(index, state.specs[index].numel) for index in indices]
        flat = dense_delta(tensors, weights, noise.distribution, shift, where, cache)
        small.update(zip(indices, flat.split([numel for _, numel in tensors])))
    for index, spec in enumerate(state.specs):
        if index in small:
            yield index, 0, small.pop(index)
        elif spec.treatment != "frozen":
            yield from tensor_deltas(spec, index, weights, noise, where, cache)


def apply_iteration_(
    state: MasterState,
    update: IterationUpdate,
    noise: NoiseConfig,
    base: BaseSource | None = None,
    decay: int = 0,
    cache: NoiseCache | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Q <- Q + ΔQ - round_half_even((Q - Q_base)·decay / 2^24), in place, chunk by chunk: each new Q
    is computed in int64 on `device`, range-checked, and only then narrowed into the Q_DTYPE tensor.

    On FixedPointOverflow the state is partly updated (the failing tensor too): rebuild it.
    """
    if decay and base is None:
        raise ValueError("anchored decay needs the base state")
    weights = seed_weights(update.members, update.coefficients)
    if not weights and not decay:
        return  # ΔQ = 0 everywhere: nothing moves
    for index, start, delta in state_deltas(state, weights, noise, cache, device):
        spec, flat = state.specs[index], state.resident(index).view(-1)
        stop = start + delta.numel()
        current = flat[start:stop].to(delta.device)  # Q_DTYPE: the adds below widen it element by element
        if decay:
            assert base is not None
            drift = current.to(torch.int64) - base.read(index, start, stop).to(delta.device)
            if drift.numel() and int(drift.abs().max().item()) * decay >= 1 << 62:
                raise FixedPointOverflow(f"anchored decay of {spec.name!r} would overflow int64")
            delta.sub_(rne_shift(drift.mul_(decay), DECAY_BITS))
        # int64 cannot wrap: |Q| < 2^31, |ΔQ| <= 2^62 + 2^33. A float64 ΔQ (tensor_deltas) is below 2^52
        # and |D| < 2^38, so every sum is an integer below 2^53: exact.
        candidate = delta.add_(current)
        check_range(candidate, spec.name)
        flat[start:stop].copy_(candidate)  # exact: |Q| < 2^31 was just checked
        del current, candidate, delta  # one chunk's temporaries at a time, not two while the next is drawn


def member_deltas(
    state: MasterState,
    member: MemberNoise,
    sigma: int,
    noise: NoiseConfig,
    cache: NoiseCache | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(index, start, flat int64 perturbation σ·sign·E of elements start..) of every tensor a member moves."""
    return state_deltas(state, {member.seed: member.sign * sigma}, noise, cache, device)
