"""The integer master state of a causal LM: tensor plan, fixed-point tensors, canonical hash."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch
from torch import nn

from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import choose_exponent, derive, to_fixed

TREATMENTS = ("dense", "lowrank", "frozen")


@dataclass(frozen=True)
class MasterState:
    """Q tensors (int64) aligned with specs; w = Q·2^-F. Only update.apply_iteration_ mutates Q."""

    specs: tuple[TensorSpec, ...]
    q: tuple[torch.Tensor, ...]

    def clone(self) -> MasterState:
        return MasterState(self.specs, tuple(t.clone() for t in self.q))

    def to(self, device: torch.device | str) -> MasterState:
        return MasterState(self.specs, tuple(t.to(device) for t in self.q))


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
    """Genesis state: each tensor's exponent from its largest magnitude, Q by round-half-even."""
    specs, tensors = [], []
    for name, param in canonical_parameters(model):
        exponent = choose_exponent(param)
        specs.append(tensor_spec(name, tuple(param.shape), exponent, plan[name]))
        tensors.append(to_fixed(param.detach().cpu(), exponent))
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
    with torch.no_grad():
        for spec, q in zip(state.specs, state.q):
            param = model.get_parameter(spec.name)
            param.copy_(derive(q.to(param.device), spec.exponent, param.dtype).view(param.shape))


def state_hash(state: MasterState) -> bytes:
    """SHA-256 over the canonical serialization (PROTOCOL §2.4)."""
    digest = state_digest(len(state.specs))
    for spec, q in zip(state.specs, state.q):
        digest.update(tensor_header(spec))
        digest.update(q_bytes(q))
    return digest.digest()


def state_digest(tensor_count: int) -> "hashlib._Hash":
    """The state hash's SHA-256 after its header; feed each tensor's header then its Q bytes."""
    digest = hashlib.sha256()
    digest.update(b"swarmtune/state/v1\x00")
    digest.update(struct.pack("<I", tensor_count))
    return digest


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
    """Q (whole or any row-major run of it) as little-endian int64 bytes."""
    return q.detach().cpu().contiguous().numpy().astype("<i8", copy=False).data
