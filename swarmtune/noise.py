"""Counter-based integer noise: the same bits on every device, thread count and instruction set."""

from __future__ import annotations

import functools
import hashlib
import statistics
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

NOISE_VERSION = "swarmtune-noise/1"

ROLE_DENSE = 0
ROLE_LOWRANK_A = 1
ROLE_LOWRANK_B = 2

DISTRIBUTIONS = ("rademacher", "gaussian")
FAMILIES = ("dense", "lowrank")

# Gaussian noise is an integer g with g / 2**GAUSSIAN_SCALE_BITS ~ N(0, 1).
GAUSSIAN_SCALE_BITS = 12
GAUSSIAN_TABLE_SHA256 = "1ea009ce409dac97d6bd609266910f809c5fb912f78e16bd89145b08174d6fc5"

# Elements generated per chunk: bounds peak memory and keeps the working set in cache.
CHUNK_ELEMENTS = 1 << 21


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores it (two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)
MIX_MUL_1 = _signed(0xBF58476D1CE4E5B9)
MIX_MUL_2 = _signed(0x94D049BB133111EB)


@dataclass(frozen=True)
class NoiseConfig:
    """Which perturbations a job uses (recorded in genesis)."""

    family: str = "dense"  # "dense" or "lowrank"
    distribution: str = "gaussian"  # dense noise: "rademacher" or "gaussian"; low-rank factors are always ±1
    rank: int = 1

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"noise family must be one of {FAMILIES}, got {self.family!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"noise distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if not 1 <= self.rank <= 64:
            raise ValueError(f"low-rank rank must be in [1, 64], got {self.rank}")


def stream_key(seed: int, tensor_index: int, role: int) -> int:
    """The 64-bit key of one noise stream, as a signed int64 for torch."""
    payload = (
        b"swarmtune/noise/v1"
        + seed.to_bytes(8, "little")
        + tensor_index.to_bytes(4, "little")
        + bytes([role])
    )
    return _signed(int.from_bytes(hashlib.sha256(payload).digest()[:8], "little"))


def hash_blocks(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """splitmix64 of counters start..start+count-1 under `key`: block j is mix(key + (j+1)·γ)."""
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    return _mix_(z.mul_(GOLDEN_GAMMA).add_(key))  # int64 multiply wraps modulo 2**64, as splitmix64 needs


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer, in place."""
    shifted = torch.empty_like(z)  # one scratch buffer for the three xor-shifts: half the memory traffic
    for bits, multiplier in ((30, MIX_MUL_1), (27, MIX_MUL_2), (31, 1)):
        # torch's >> on int64 is arithmetic; masking off the smeared sign bits makes it logical.
        torch.bitwise_right_shift(z, bits, out=shifted).bitwise_and_((1 << (64 - bits)) - 1)
        z.bitwise_xor_(shifted)
        if multiplier != 1:
            z.mul_(multiplier)
    return z


def _require_little_endian() -> None:
    # Fields are taken from blocks through dtype views; the spec numbers them LSB-first.
    if sys.byteorder != "little":
        raise RuntimeError("swarmtune noise needs a little-endian host")


# Stream symbols per 64-bit block: a Rademacher element takes one bit, a Gaussian one 16-bit field.
SYMBOLS_PER_BLOCK = {"rademacher": 64, "gaussian": 4}


def _block_symbols(blocks: torch.Tensor, distribution: str) -> torch.Tensor:
    """Every symbol of `blocks`, in stream order, as int32: bits LSB-first, or 16-bit fields 0..65535."""
    if distribution == "rademacher":
        shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device)
        return (blocks.view(torch.uint8).unsqueeze(-1) >> shifts).bitwise_and_(1).view(-1).to(torch.int32)
    return blocks.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).view(-1)


def _lookup(distribution: str, key: int, numel: int, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """values[symbol j] for offset <= j < offset + numel of one stream, in bounded chunks."""
    _require_little_endian()  # symbols are taken from blocks through dtype views, numbered LSB-first
    per_block = SYMBOLS_PER_BLOCK[distribution]
    out = torch.empty(numel, dtype=values.dtype, device=values.device)
    for start in range(offset, offset + numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, offset + numel)
        first_block, last_block = start // per_block, (stop + per_block - 1) // per_block
        symbols = _block_symbols(hash_blocks(key, first_block, last_block - first_block, values.device), distribution)
        skip = start - first_block * per_block
        torch.index_select(values, 0, symbols[skip : skip + stop - start], out=out[start - offset : stop - offset])
    return out


def rademacher(key: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """±1 as int8: element j is 1 - 2·(bit j mod 64 of block j // 64)."""
    return _lookup("rademacher", key, numel, noise_alphabet("rademacher", device))


def _gaussian_table_values() -> list[int]:
    normal = statistics.NormalDist()
    scale = 1 << GAUSSIAN_SCALE_BITS
    return [round(normal.inv_cdf((u + 0.5) / 65536) * scale) for u in range(65536)]


@functools.lru_cache(maxsize=None)
def gaussian_table(device: str = "cpu") -> torch.Tensor:
    """The 65,536-entry inverse-CDF table (int16), checked against its pinned SHA-256."""
    values = torch.tensor(_gaussian_table_values(), dtype=torch.int16)
    digest = hashlib.sha256(values.numpy().astype("<i2").tobytes()).hexdigest()
    if digest != GAUSSIAN_TABLE_SHA256:
        raise RuntimeError(
            f"the Gaussian noise table hashes to {digest}, not the pinned {GAUSSIAN_TABLE_SHA256}: "
            "this platform's inverse normal CDF differs; report it with your Python build"
        )
    return values.to(device)


def gaussian(key: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Table Gaussian as int16: element j is TABLE[16-bit field j mod 4 of block j // 4]."""
    return _lookup("gaussian", key, numel, noise_alphabet("gaussian", device))


def noise_alphabet(distribution: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every value a dense noise element can take, indexed by its stream symbol (bit or 16-bit field)."""
    if distribution == "rademacher":
        return torch.tensor([1, -1], dtype=torch.int8, device=device)
    if distribution == "gaussian":
        return gaussian_table(str(torch.device(device)))
    raise ValueError(f"unknown noise distribution {distribution!r}")


@functools.lru_cache(maxsize=None)
def noise_bound(distribution: str) -> int:
    """The largest |E| a dense noise element can take (1, or the Gaussian table's extreme)."""
    return int(noise_alphabet(distribution).abs().max().item())


def dense_noise_map(
    seed: int, tensors: Sequence[tuple[int, int]], distribution: str, values: torch.Tensor, start: int = 0
) -> torch.Tensor:
    """values[symbol] for each element of the dense noise of `tensors` ((index, numel) pairs),
    concatenated: f(E) for any elementwise f by mapping the alphabet once (values =
    f(noise_alphabet(...))) instead of every element.

    One tensor is generated in bounded chunks, and may be a run of it: elements start..start+numel
    (the same values as that slice of the whole). Several (meant for small ones) in one pass, where
    per-call overhead, not arithmetic, is the cost.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown noise distribution {distribution!r}")
    if len(tensors) == 1:
        ((index, numel),) = tensors
        return _lookup(distribution, stream_key(seed, index, ROLE_DENSE), numel, values, start)
    if start:
        raise ValueError("a start offset applies to one tensor's noise, not to a batch of tensors")
    _require_little_endian()
    device, per_block = values.device, SYMBOLS_PER_BLOCK[distribution]
    numels = [numel for _, numel in tensors]
    blocks = torch.tensor([(numel + per_block - 1) // per_block for numel in numels], dtype=torch.int64, device=device)
    keys = torch.tensor([stream_key(seed, index, ROLE_DENSE) for index, _ in tensors], dtype=torch.int64, device=device)
    first = torch.repeat_interleave(blocks.cumsum(0) - blocks, blocks)
    # Each tensor's blocks count 1, 2, ... under its own key, exactly as hash_blocks numbers them.
    z = torch.arange(1, first.numel() + 1, dtype=torch.int64, device=device).sub_(first)
    every = _block_symbols(_mix_(z.mul_(GOLDEN_GAMMA).add_(torch.repeat_interleave(keys, blocks))), distribution)
    starts = [per_block * int(b) for b in (blocks.cumsum(0) - blocks).tolist()]
    kept = torch.cat([every[start : start + numel] for start, numel in zip(starts, numels)])
    return values.index_select(0, kept)


def lowrank_factors(
    seed: int, tensor_index: int, out_features: int, in_features: int, rank: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """±1 factors (A: out×r, B: in×r, int8) of the low-rank noise E = A·Bᵀ/√r of one matrix."""
    a, b = population_factors([seed], tensor_index, out_features, in_features, rank, device)
    return a[0], b[0]


def rademacher_rows(keys: Sequence[int], numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """rademacher(key, numel) for many keys in one pass (keys × numel, int8): the same bits, one
    call for a whole population instead of one per seed and matrix."""
    if not keys:
        return torch.empty(0, numel, dtype=torch.int8, device=device)
    blocks = torch.arange(1, (numel + 63) // 64 + 1, dtype=torch.int64, device=device).mul_(GOLDEN_GAMMA)
    z = _mix_(blocks.unsqueeze(0) + torch.tensor(list(keys), dtype=torch.int64, device=device).unsqueeze(1))
    bits = _block_symbols(z, "rademacher").view(len(keys), -1)[:, :numel]
    return 1 - 2 * bits.to(torch.int8)


def population_factors(
    seeds: Sequence[int], tensor_index: int, out_features: int, in_features: int, rank: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """lowrank_factors of one matrix for many seeds: A (seeds × out × r), B (seeds × in × r), int8."""
    _require_little_endian()
    keys_a = [stream_key(seed, tensor_index, ROLE_LOWRANK_A) for seed in seeds]
    keys_b = [stream_key(seed, tensor_index, ROLE_LOWRANK_B) for seed in seeds]
    a = rademacher_rows(keys_a, out_features * rank, device).view(len(seeds), out_features, rank)
    b = rademacher_rows(keys_b, in_features * rank, device).view(len(seeds), in_features, rank)
    return a, b
