"""Bytes per role: the host and accelerator memory a worker or a replay needs, from its tensor plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from swarmtune.entries import TensorSpec
from swarmtune.state import row_chunks

# A Python process with torch, transformers and a tokenizer loaded, before any weights (measured
# 0.35-0.38 GB), and what working adds that no parameter count scales: the allocator's retention,
# first-use caches, a small batch's activations (measured 40-70 MB on a quiet machine, up to ~115 MB
# in a fresh CI environment under load: the allocator keeps more of what threads freed).
PROCESS_BYTES = 400 << 20
WORKING_BYTES = 128 << 20
# The master state at rest: int32 (fixedpoint.Q_DTYPE).
Q_BYTES = 4
# Live bytes per element of one chunk of the update or of a member's perturbation: the int64 Q being
# formed, ΔQ and one seed's term (or the low-rank GEMM's float64 part and its int64 copy), the base
# run and drift under anchored decay, the rounding's temporary, the derived float64 and float32:
# eight 8-byte values (measured: 6-8).
SCRATCH_BYTES_PER_ELEMENT = 64


@dataclass(frozen=True)
class MemoryBudget:
    """Peak bytes of one role: on the host (RSS) and on the accelerator (0 on a CPU-only run)."""

    parameters: int
    host_bytes: int
    device_bytes: int

    @property
    def host_bytes_per_param(self) -> float:
        return self.host_bytes / max(1, self.parameters)

    @property
    def device_bytes_per_param(self) -> float:
        return self.device_bytes / max(1, self.parameters)


def parameter_count(specs: Sequence[TensorSpec]) -> int:
    """Parameters of the state (tied weights once, as the plan lists them)."""
    return sum(spec.numel for spec in specs)


def largest_chunk(specs: Sequence[TensorSpec]) -> int:
    """Elements of the largest run any per-tensor pass works on (state.row_chunks): at most
    state.CHUNK_ELEMENTS unless one row is wider."""
    return max((stop - start for spec in specs for start, stop in row_chunks(spec.shape)), default=0)


def scratch_bytes(specs: Sequence[TensorSpec]) -> int:
    """One chunk's temporaries: what the update, a member's perturbation or the hash adds at most."""
    return SCRATCH_BYTES_PER_ELEMENT * largest_chunk(specs)


def resident_count(specs: Sequence[TensorSpec]) -> int:
    """Parameters whose Q is resident: all but frozen tensors' (state.assemble spills those to disk)."""
    return sum(spec.numel for spec in specs if spec.treatment != "frozen")


def worker_memory(specs: Sequence[TensorSpec], param_bytes: int, device: str, noise_cache_bytes: int) -> MemoryBudget:
    """A worker: the model's params (param_bytes each: 2 for bf16) where it evaluates, the int32 master
    of every tensor that is not frozen on the host (a frozen tensor's Q is a spill file, read back a
    chunk at a time), one chunk's scratch and the noise cache where the update computes, the fixed
    process cost. Anchored decay adds nothing resident (its base is a spill file too, spillfile.py).
    Evaluation activations (KV cache, logits) come on top, on the evaluating device."""
    count = parameter_count(specs)
    model = param_bytes * count
    working = scratch_bytes(specs) + noise_cache_bytes + WORKING_BYTES
    master = Q_BYTES * resident_count(specs)
    if device == "cpu":
        return MemoryBudget(count, PROCESS_BYTES + model + master + working, 0)
    return MemoryBudget(count, PROCESS_BYTES + master, model + working)


def replay_memory(specs: Sequence[TensorSpec]) -> MemoryBudget:
    """`replay`, `audit --replay`, `export` on the host, the base read from a model's safetensors files
    (replay.replica_from_files: no model loaded): a CPU worker without params or noise cache."""
    return worker_memory(specs, 0, "cpu", 0)


