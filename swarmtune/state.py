"""The integer master state of a causal LM: tensor plan, int32 fixed-point tensors, canonical hash."""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch
from torch import nn

from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import Q_DTYPE, choose_exponent, derive, to_fixed

TREATMENTS = ("dense", "lowrank", "frozen")
# Every per-tensor pass (update, perturbation, derive, hash) works on row runs of at most this many
# elements: its temporaries (~32 MB in all) stay far below a layer, never tensor-sized (a tied
# embedding: 1 GB+ as int64); at 0.5B every 64 MB is 0.13 of the 7 bytes a parameter allowed, and
# per-call overhead is still negligible at half a million elements.
CHUNK_ELEMENTS = 1 << 19
STATE_HASH_DOMAIN = b"swarmtune/state/v2"


@dataclass(frozen=True)
class MasterState:
    """Q tensors (Q_DTYPE, int32) aligned with specs; w = Q·2^-F. Only update.apply_iteration_ and a
    snapshot loader (then Replica.restore) mutate Q."""

    specs: tuple[TensorSpec, ...]
    q: tuple[torch.Tensor, ...]

    def clone(self) -> MasterState:
        return MasterState(self.specs, tuple(t.clone() for t in self.q))

    def to(self, device: torch.device | str) -> MasterState:
        return MasterState(self.specs, tuple(t.to(device) for t in self.q))

    def read(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Flat elements start..stop of tensor `index`, widened to int64 (a base the update reads)."""
        return self.q[index].reshape(-1)[start:stop].to(torch.int64)


def row_chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Flat element ranges (start, stop) of whole rows, at most CHUNK_ELEMENTS each (one row if a row
    is larger), covering a tensor of `shape` in row-major order."""
    numel = math.prod(shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // row) * row if row else numel
    return [(start, min(start + step, numel)) for start in range(0, numel, step)] if numel else [(0, 0)]


def parameter_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Canonical name of each floating-point parameter -> all its names, in module order (a tie's
    source, the module that registered it, first)."""
    return {name: names for name, names, _ in _canonical(model)}


def canonical_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Floating-point parameters, tied ones once under their smallest name, sorted by UTF-8 name."""
    return [(name, param) for name, _, param in _canonical(model)]


def _canonical(model: nn.Module) -> list[tuple[str, tuple[str, ...], nn.Parameter]]:
    names_by_param: dict[int, list[str]] = {}
    param_by_id: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.is_floating_point():
            names_by_param.setdefault(id(param), []).append(name)
            param_by_id[id(param)] = param
    canonical = [
        (min(names, key=str.encode), tuple(names), param_by_id[pid]) for pid, names in names_by_param.items()
    ]
    return sorted(canonical, key=lambda item: item[0].encode())


def lowrank_eligible(model: nn.Module) -> set[str]:
    """Weights of nn.Linear modules that are used nowhere else (tied matrices stay dense/frozen)."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    eligible = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and uses.get(id(module.weight)) == 1:
            eligible.add(f"{module_name}.weight" if module_name else "weight")
    return eligible


def build_plan(model: nn.Module, family: str, lowrank_others: str = "frozen") -> dict[str, str]:
    """Treatment per canonical tensor: dense family perturbs all; low-rank perturbs Linear weights."""
    names = [name for name, _ in canonical_parameters(model)]
    if family == "dense":
        return {name: "dense" for name in names}
    if family != "lowrank":
        raise ValueError(f"unknown noise family {family!r}")
    if lowrank_others not in ("frozen", "dense"):
        raise ValueError(f"lowrank_others must be 'frozen' or 'dense', got {lowrank_others!r}")
    eligible = lowrank_eligible(model)
    return {name: ("lowrank" if name in eligible else lowrank_others) for name in names}


def master_from_model(model: nn.Module, plan: dict[str, str]) -> MasterState:
    """Genesis state on the host: each tensor's exponent from its largest magnitude, Q by
    round-half-even, converted chunk by chunk (no float64 copy of a whole tensor)."""
    specs, tensors = [], []
    for name, param in canonical_parameters(model):
        exponent = choose_exponent(param)
        specs.append(tensor_spec(name, tuple(param.shape), exponent, plan[name]))
        q = torch.empty(tuple(param.shape), dtype=Q_DTYPE)
        flat, source = q.view(-1), param.detach().reshape(-1)
        for start, stop in row_chunks(tuple(param.shape)):
            flat[start:stop] = to_fixed(source[start:stop].cpu(), exponent)
        tensors.append(q)
    return MasterState(tuple(specs), tuple(tensors))


def tensor_spec(name: str, shape: tuple[int, ...], exponent: int, treatment: str) -> TensorSpec:
    """One tensor's plan entry, its treatment checked against its shape."""
    if treatment not in TREATMENTS:
        raise ValueError(f"unknown treatment {treatment!r} for {name}")
    if treatment == "lowrank" and len(shape) != 2:
        raise ValueError(f"{name} has {len(shape)} dimensions; low-rank needs a matrix")
    return TensorSpec(name, shape, exponent, treatment)


def write_weights(model: nn.Module, state: MasterState) -> None:
    """Overwrite the model's parameters with the derived weights of `state` (tied ones once)."""
    for spec, q in zip(state.specs, state.q):
        write_derived(model.get_parameter(spec.name), q, spec)


def write_derived(param: torch.Tensor, q: torch.Tensor, spec: TensorSpec) -> None:
    """param <- derive(Q) of one tensor, chunk by chunk (derived on Q's device, copied to param's)."""
    flat, source = param.data.view(-1), q.reshape(-1)
    with torch.no_grad():
        for start, stop in row_chunks(spec.shape):
            flat[start:stop].copy_(derive(source[start:stop], spec.exponent, param.dtype))


def state_hash(state: MasterState) -> bytes:
    """SHA-256 over the canonical serialization (PROTOCOL §2.4)."""
    digest = state_digest(len(state.specs))
    for spec, q in zip(state.specs, state.q):
        digest.update(tensor_header(spec))
        flat = q.reshape(-1)
        for start, stop in row_chunks(spec.shape):
            digest.update(q_bytes(flat[start:stop]))
    return digest.digest()


def state_digest(tensor_count: int) -> "hashlib._Hash":
    """The state hash's SHA-256 after its header; feed each tensor's header then its Q bytes."""
    return hashlib.sha256(state_preamble(tensor_count))


def state_preamble(tensor_count: int) -> bytes:
    """The state hash's first bytes (its domain and tensor count): what a snapshot's state part starts with."""
    return STATE_HASH_DOMAIN + b"\x00" + struct.pack("<I", tensor_count)


def tensor_header(spec: TensorSpec) -> bytes:
    """name, shape and exponent of one tensor as the state hash serializes them."""
    name = spec.name.encode()
    return b"".join(
        [
            struct.pack("<I", len(name)) + name,
            struct.pack("<I", len(spec.shape)),
            b"".join(struct.pack("<Q", dim) for dim in spec.shape),
            struct.pack("<i", spec.exponent),
        ]
    )


def q_bytes(q: torch.Tensor) -> memoryview:
    """Q (whole or any row-major run of it, Q_DTYPE) as little-endian int32 bytes (i32le)."""
    if q.dtype != Q_DTYPE:
        raise TypeError(f"the state hash serializes {Q_DTYPE} tensors, got {q.dtype}: convert with fixedpoint.to_fixed")
    return q.detach().cpu().contiguous().numpy().astype("<i4", copy=False).data
