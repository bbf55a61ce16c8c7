"""An independent pure-Python (int) implementation of PROTOCOL v2 §1–4, used to check the torch one."""

from __future__ import annotations

import hashlib
import math
import statistics
import struct
from fractions import Fraction

MASK = (1 << 64) - 1


def mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def block(key: int, j: int) -> int:
    return mix((key + (j + 1) * 0x9E3779B97F4A7C15) & MASK)


def stream_key(seed: int, tensor_index: int, role: int) -> int:
    payload = b"swarmtune/noise/v1" + seed.to_bytes(8, "little") + tensor_index.to_bytes(4, "little") + bytes([role])
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def member_seed(job_seed: int, t: int, j: int) -> int:
    payload = b"swarmtune/seed/v1" + job_seed.to_bytes(8, "little") + t.to_bytes(8, "little") + j.to_bytes(8, "little")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def rademacher(key: int, n: int) -> list[int]:
    return [1 - 2 * ((block(key, j // 64) >> (j % 64)) & 1) for j in range(n)]


def gaussian_table() -> list[int]:
    normal = statistics.NormalDist()
    return [round(normal.inv_cdf((u + 0.5) / 65536) * 4096) for u in range(65536)]


def gaussian(key: int, n: int, table: list[int]) -> list[int]:
    return [table[(block(key, j // 4) >> (16 * (j % 4))) & 0xFFFF] for j in range(n)]


def rne(x: int, shift: int) -> int:
    return round(Fraction(x, 1 << shift))  # Fraction.__round__ rounds half to even


def dense_delta(weights: dict[int, int], tensor_index: int, n: int, distribution: str, exponent: int) -> list[int]:
    table = gaussian_table() if distribution == "gaussian" else None
    total = [0] * n
    for seed, w in weights.items():
        key = stream_key(seed, tensor_index, 0)
        noise = gaussian(key, n, table) if table else rademacher(key, n)
        total = [acc + w * e for acc, e in zip(total, noise)]
    bits = 12 if distribution == "gaussian" else 0
    return [rne(v, 40 + bits - exponent) for v in total]


def lowrank_delta(weights: dict[int, int], tensor_index: int, rows: int, cols: int, rank: int, exponent: int) -> list[int]:
    scale = round(65536 / math.sqrt(rank))
    total = [0] * (rows * cols)
    for seed, w in weights.items():
        a = rademacher(stream_key(seed, tensor_index, 1), rows * rank)
        b = rademacher(stream_key(seed, tensor_index, 2), cols * rank)
        for i in range(rows):
            for k in range(cols):
                total[i * cols + k] += w * scale * sum(a[i * rank + r] * b[k * rank + r] for r in range(rank))
    return [rne(v, 40 + 16 - exponent) for v in total]


def state_hash(tensors: list[tuple[str, tuple[int, ...], int, list[int]]]) -> bytes:
    """§2.4 over (name, shape, exponent, Q row-major) tensors: v2 domain, Q as i32le."""
    data = b"swarmtune/state/v2\x00" + struct.pack("<I", len(tensors))
    for name, shape, exponent, q in tensors:
        assert all(-(1 << 31) < v < 1 << 31 for v in q), f"{name}: |Q| >= 2^31 is an overflow, not a state"
        raw = name.encode()
        data += struct.pack("<I", len(raw)) + raw + struct.pack("<I", len(shape))
        data += b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<i", exponent)
        data += b"".join(struct.pack("<i", v) for v in q)
    return hashlib.sha256(data).digest()


def apply_update(q: list[int], delta: list[int]) -> list[int]:
    """§4 step 4 with its range rule: the new Q, refused (never wrapped) at |Q| >= 2^31."""
    after = [v + d for v, d in zip(q, delta)]
    if any(abs(v) >= 1 << 31 for v in after):
        raise OverflowError("|Q| >= 2^31: the iteration is invalid")
    return after
