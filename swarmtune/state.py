"""The integer master state of a causal LM: tensor plan, int32 fixed-point tensors, canonical hash."""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import Q_DTYPE, choose_exponent, derive, to_fixed
from swarmtune.spillfile import SpillFile

TREATMENTS = ("dense", "lowrank", "frozen")
# Every per-tensor pass (update, perturbation, derive, hash) works on row runs of at most this many
# elements: its temporaries (~16 MB in all) stay far below a layer, never tensor-sized (a tied
# embedding: 1 GB+ as int64). The allocator keeps the holes they leave, up to a few times their size:
# 2^18 instead of 2^19 lowered the 0.5B dense worker's peak by ~20 MB (0.05 of the 7 bytes a parameter
# allowed) for 3-7% more time in the dense update's per-call overhead (docs/SCALE.md).
CHUNK_ELEMENTS = 1 << 18
STATE_HASH_DOMAIN = b"swarmtune/state/v2"


@dataclass(frozen=True)
class MasterState:
    """Q tensors (Q_DTYPE, int32) aligned with specs; w = Q·2^-F. A tensor held in `spill` (a frozen one:
    its Q never changes after genesis) is not resident: its entry in `q` is a meta tensor of its shape
    that holds no data, so reading it directly fails; `run`, `runs` and `whole` read any tensor. Only
    update.apply_iteration_ and a snapshot loader (then Replica.restore) mutate Q, through `resident`."""

    specs: tuple[TensorSpec, ...]
    q: tuple[torch.Tensor, ...]
    spill: SpillFile | None = None

    def __post_init__(self) -> None:
        if len(self.q) != len(self.specs):
            raise ValueError(f"{len(self.specs)} tensor specs but {len(self.q)} Q tensors")
        for index, (spec, q) in enumerate(zip(self.specs, self.q)):
            if q.is_meta != (self.spill is not None and index in self.spill):
                raise ValueError(f"tensor {spec.name}'s Q must be a meta tensor exactly when it is spilled")

    def clone(self) -> MasterState:
        """A copy whose resident Q can change apart from this one's; spilled Q is never written again,
        so the copy shares the spill file (and its meta placeholders)."""
        return MasterState(self.specs, tuple(q if q.is_meta else q.clone() for q in self.q), self.spill)

    def to(self, device: torch.device | str) -> MasterState:
        """Resident Q on `device`; spilled Q stays in the spill file (it is read onto the host)."""
        return MasterState(self.specs, tuple(q if q.is_meta else q.to(device) for q in self.q), self.spill)

    @property
    def device(self) -> torch.device:
        """Where resident Q lives (the host when every tensor is spilled)."""
        return next((q.device for q in self.q if not q.is_meta), torch.device("cpu"))

    def spilled(self, index: int) -> bool:
        return self.q[index].is_meta

    def resident(self, index: int) -> torch.Tensor:
        """Tensor `index`'s Q in memory, to update in place; a spilled tensor's is refused (it is frozen)."""
        if self.spilled(index):
            raise ValueError(f"tensor {self.specs[index].name} is frozen and spilled to disk: its Q never changes; read it with run()")
        return self.q[index]

    def run(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Flat Q elements start..stop of tensor `index` (Q_DTYPE): a view of resident Q, or read from the spill."""
        if self.spill is not None and self.spilled(index):
            return self.spill.read(index, start, stop)
        return self.q[index].reshape(-1)[start:stop]

    def runs(self, index: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, flat Q elements start..) of tensor `index` by its row chunks: one chunk read at a time."""
        for start, stop in row_chunks(self.specs[index].shape):
            yield start, self.run(index, start, stop)

    def whole(self, index: int) -> torch.Tensor:
        """Tensor `index`'s Q in its shape: resident Q itself, or a temporary read from the spill (tensor-sized)."""
        spec = self.specs[index]
        return self.run(index, 0, spec.numel).view(spec.shape) if self.spilled(index) else self.q[index]

    def read(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Flat elements start..stop of tensor `index`, widened to int64 (a base the update reads)."""
        return self.run(index, start, stop).to(torch.int64)


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
    parameters = canonical_parameters(model)
    specs = tuple(tensor_spec(name, tuple(param.shape), choose_exponent(param), plan[name]) for name, param in parameters)

    def runs(index: int) -> Iterator[torch.Tensor]:
        source = parameters[index][1].detach().reshape(-1)
        for start, stop in row_chunks(specs[index].shape):
            yield to_fixed(source[start:stop].cpu(), specs[index].exponent)

    return assemble(specs, runs)


def assemble(specs: tuple[TensorSpec, ...], runs: Callable[[int], Iterable[torch.Tensor]]) -> MasterState:
    """A master state from each tensor's Q in consecutive row-major runs (`runs(index)`): frozen tensors
    spilled to an unlinked file as they come (never resident: at 0.5B the tied embedding is 0.55 GB of
    Q that no update writes), the others filled into int32 tensors on the host."""
    # Every resident Q allocated (untouched, so not yet resident) before any run: the runs' temporaries
    # then come and go above them instead of leaving holes between them (glibc's moving mmap threshold
    # puts mid-sized Q on the heap): 4.4 B/param on a 67M model, against 4.8-6.1 allocated as read.
    frozen = [spec.treatment == "frozen" for spec in specs]
    spill = SpillFile() if any(frozen) else None
    tensors = tuple(
        torch.empty(spec.shape, dtype=Q_DTYPE, device="meta" if cold else "cpu") for spec, cold in zip(specs, frozen)
    )
    for index, q in enumerate(tensors):
        if spill is not None and frozen[index]:
            spill.write(index, runs(index))
            continue
        flat, first = q.view(-1), 0
        for run in runs(index):
            flat[first : first + run.numel()] = run
            first += run.numel()
    return MasterState(specs, tensors, spill)


def tensor_spec(name: str, shape: tuple[int, ...], exponent: int, treatment: str) -> TensorSpec:
    """One tensor's plan entry, its treatment checked against its shape."""
    if treatment not in TREATMENTS:
        raise ValueError(f"unknown treatment {treatment!r} for {name}")
    if treatment == "lowrank" and len(shape) != 2:
        raise ValueError(f"{name} has {len(shape)} dimensions; low-rank needs a matrix")
    return TensorSpec(name, shape, exponent, treatment)


def write_weights(model: nn.Module, state: MasterState) -> None:
    """Overwrite the model's parameters with the derived weights of `state` (tied ones once)."""
    for index, spec in enumerate(state.specs):
        write_derived(model.get_parameter(spec.name), state, index)


def write_derived(param: torch.Tensor, state: MasterState, index: int) -> None:
    """param <- derive(Q) of tensor `index`, chunk by chunk (derived on Q's device, copied to param's)."""
    flat, exponent = param.data.view(-1), state.specs[index].exponent
    with torch.no_grad():
        for start, run in state.runs(index):
            flat[start : start + run.numel()].copy_(derive(run, exponent, param.dtype))


def state_hash(state: MasterState) -> bytes:
    """SHA-256 over the canonical serialization (PROTOCOL §2.4)."""
    digest = state_digest(len(state.specs))
    for index, spec in enumerate(state.specs):
        digest.update(tensor_header(spec))
        for _, run in state.runs(index):
            digest.update(q_bytes(run))
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
    if q.is_meta:
        raise ValueError("this Q is a spilled (frozen) tensor's placeholder, not its values: read it with MasterState.run or runs")
    if q.dtype != Q_DTYPE:
        raise TypeError(f"the state hash serializes {Q_DTYPE} tensors, got {q.dtype}: convert with fixedpoint.to_fixed")
    return q.detach().cpu().contiguous().numpy().astype("<i4", copy=False).data
