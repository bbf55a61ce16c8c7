"""Counter-based integer noise: the same bits on every device, thread count and instruction set."""

from __future__ import annotations

import functools
import hashlib
import statistics
import sys
from dataclasses import dataclass

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


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the smeared sign bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash_blocks(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """splitmix64 of counters start..start+count-1 under `key`: block j is mix(key + (j+1)·γ)."""
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z.mul_(GOLDEN_GAMMA).add_(key)  # int64 multiply wraps modulo 2**64, as splitmix64 needs
    z.bitwise_xor_(_logical_shift_right(z, 30)).mul_(MIX_MUL_1)
    z.bitwise_xor_(_logical_shift_right(z, 27)).mul_(MIX_MUL_2)
    return z.bitwise_xor_(_logical_shift_right(z, 31))


def _require_little_endian() -> None:
    # Fields are taken from blocks through dtype views; the spec numbers them LSB-first.
    if sys.byteorder != "little":
        raise RuntimeError("swarmtune noise needs a little-endian host")


def rademacher(key: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """±1 as int8: element j is 1 - 2·(bit j mod 64 of block j // 64)."""
    _require_little_endian()
    out = torch.empty(numel, dtype=torch.int8, device=device)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    for start in range(0, numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, numel)
        first_block, last_block = start // 64, (stop + 63) // 64
        octets = hash_blocks(key, first_block, last_block - first_block, device).view(torch.uint8)
        bits = (octets.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)
        offset = start - first_block * 64
        chunk = bits[offset : offset + stop - start].view(torch.int8)
        out[start:stop] = 1 - 2 * chunk
    return out


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
    _require_little_endian()
    device = torch.device(device)
    table = gaussian_table(str(device))
    out = torch.empty(numel, dtype=torch.int16, device=device)
    for start in range(0, numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, numel)
        first_block, last_block = start // 4, (stop + 3) // 4
        fields = hash_blocks(key, first_block, last_block - first_block, device).view(torch.int16)
        offset = start - first_block * 4
        index = fields[offset : offset + stop - start].to(torch.int32).bitwise_and_(0xFFFF)
        out[start:stop] = table[index]
    return out


def dense_noise(
    seed: int, tensor_index: int, numel: int, distribution: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The flat dense noise of one tensor for one seed (int8 ±1 or int16 table Gaussian)."""
    key = stream_key(seed, tensor_index, ROLE_DENSE)
    if distribution == "rademacher":
        return rademacher(key, numel, device)
    if distribution == "gaussian":
        return gaussian(key, numel, device)
    raise ValueError(f"unknown noise distribution {distribution!r}")


def lowrank_factors(
    seed: int, tensor_index: int, out_features: int, in_features: int, rank: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """±1 factors (A: out×r, B: in×r, int8) of the low-rank noise E = A·Bᵀ/√r of one matrix."""
    a = rademacher(stream_key(seed, tensor_index, ROLE_LOWRANK_A), out_features * rank, device)
    b = rademacher(stream_key(seed, tensor_index, ROLE_LOWRANK_B), in_features * rank, device)
    return a.view(out_features, rank), b.view(in_features, rank)
