"""The genesis state of a model directory (plan, hash, master Q) read from its safetensors files tensor by tensor, never the whole model."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from swarmtune.entries import TensorSpec
from swarmtune.fixedpoint import EXPONENT_MAX, choose_exponent, to_fixed
from swarmtune.state import (
    MasterState,
    assemble,
    build_plan,
    master_from_model,
    parameter_aliases,
    q_bytes,
    state_digest,
    state_hash,
    tensor_header,
    tensor_spec,
)

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Elements per read: a few 8-byte temporaries of this size (2 MB each) bound the memory at any model size.
CHUNK_ELEMENTS = 1 << 18
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class StateFileError(ValueError):
    """The model directory's files do not hold the model its config describes; the message says what differs."""


class NotStreamable(Exception):
    """Loading with transformers would transform these files (conversions, quantization): load instead."""


@dataclass(frozen=True)
class BaseState:
    """What genesis records of a base model (the tensor plan, the base state hash), and the dtype its
    weights load in."""

    plan: tuple[TensorSpec, ...]
    state_hash: bytes
    dtype: torch.dtype


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a safetensors file: where its bytes lie, their dtype and its shape."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class StateSource:
    """Where one canonical state tensor is read: its name in the files and its bytes there."""

    name: str  # canonical (PROTOCOL §2)
    file_name: str
    tensor: FileTensor
    also: tuple[str, ...]  # the tensor's other names the files hold (a tie saved twice): never read


@dataclass(frozen=True)
class StateFiles:
    """A model directory's state as its safetensors files hold it."""

    model: nn.Module  # on the meta device: names, ties and plans, no weights
    dtype: torch.dtype  # what from_pretrained (dtype="auto") gives the parameters
    sources: tuple[StateSource, ...]  # in canonical order
    tensors: dict[str, FileTensor]  # every tensor the files hold, by its name there


def genesis_base_state(directory: Path, family: str, lowrank_others: str) -> BaseState:
    """The base state of a model directory: streamed from its safetensors files, or (a .bin checkpoint,
    or files transformers converts while loading) from the loaded model, with a logged note."""
    try:
        return streamed_base_state(directory, family, lowrank_others)
    except NotStreamable as reason:
        log.info("loading the whole model to hash its base state: %s", reason, extra={"model": str(directory)})
    from swarmtune.models import load_model

    model, _ = load_model(directory)
    state = master_from_model(model, build_plan(model, family, lowrank_others))
    return BaseState(state.specs, state_hash(state), model.dtype)


def streamed_base_state(directory: Path, family: str, lowrank_others: str) -> BaseState:
    """The base state that master_from_model + state_hash give for the loaded model, read tensor by
    tensor in bounded chunks from the safetensors files (no state held: any model size)."""
    files = state_files(directory)
    specs = _specs(files, build_plan(files.model, family, lowrank_others))
    digest = state_digest(len(specs))
    for spec, source in zip(specs, files.sources):
        digest.update(tensor_header(spec))
        for chunk in _chunks(source.tensor, files.dtype):
            digest.update(q_bytes(to_fixed(chunk, spec.exponent)))
    return BaseState(specs, digest.digest(), files.dtype)


def master_from_files(directory: Path, plan: dict[str, str]) -> MasterState:
    """The genesis master state (master_from_model's, under `plan`: canonical name -> treatment) read tensor
    by tensor from the safetensors files: Q and chunk-sized temporaries only; non-streamable files are loaded.

    Raises StateFileError when the files hold a tensor `plan` does not list."""
    try:
        return read_master(state_files(directory), plan)
    except NotStreamable as reason:
        log.info("loading the whole model to read its base state: %s", reason, extra={"model": str(directory)})
    from swarmtune.models import load_model

    model, _ = load_model(directory)
    try:
        return master_from_model(model, plan)
    except KeyError as exc:
        raise StateFileError(f"{directory}: the model has tensor {exc.args[0]} that the tensor plan does not list") from None


def read_master(files: StateFiles, plan: dict[str, str]) -> MasterState:
    """The master state of opened state files under `plan`, each Q filled (or, frozen, spilled) chunk by chunk."""
    specs = _specs(files, plan)

    def runs(index: int) -> Iterator[torch.Tensor]:
        return (to_fixed(chunk, specs[index].exponent) for chunk in _chunks(files.sources[index].tensor, files.dtype))

    return assemble(specs, runs)


def state_files(directory: Path) -> StateFiles:
    """The canonical state tensors of a model directory found in its safetensors files, shapes checked
    against config.json's model (built on the meta device only)."""
    tensors = file_tensors(directory)
    model, dtype = _meta_model(directory, tensors)
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "")
    sources = []
    for name, names in parameter_aliases(model).items():
        held = [candidate for candidate in dict.fromkeys(_candidates(names, prefix)) if candidate in tensors]
        if not held:
            raise StateFileError(
                f"{directory}: the safetensors files hold no tensor {name!r} (nor {list(names)}): "
                "the files are incomplete or do not match config.json; re-download or re-save the model"
            )
        file_name, source = held[0], tensors[held[0]]
        if source.shape != shapes[name]:
            raise StateFileError(
                f"{directory}: tensor {name!r} has shape {list(source.shape)} in the files but "
                f"{list(shapes[name])} in config.json's model; the files and config.json disagree"
            )
        sources.append(StateSource(name, file_name, source, tuple(held[1:])))
    return StateFiles(model, dtype, tuple(sources), tensors)


def _specs(files: StateFiles, plan: dict[str, str]) -> tuple[TensorSpec, ...]:
    """Each source's plan entry; its exponent the smallest of its chunks' (the exponent falls as the largest
    magnitude grows, and any chunk's NaN/inf is refused: the whole tensor's exponent). No per-chunk result
    is kept: 0.5B's embedding left 260 MB of heap pinned by a list of per-chunk maxima."""
    specs = []
    for source in files.sources:
        if source.name not in plan:
            raise StateFileError(f"the model has tensor {source.name} that the tensor plan does not list")
        exponent = min((choose_exponent(chunk) for chunk in _chunks(source.tensor, files.dtype)), default=EXPONENT_MAX)
        specs.append(tensor_spec(source.name, source.tensor.shape, exponent, plan[source.name]))
    return tuple(specs)


def file_tensors(directory: Path) -> dict[str, FileTensor]:
    """Every tensor of the directory's safetensors checkpoint (single file or sharded), by name."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise NotStreamable(f"no {SINGLE_FILE} or {INDEX_FILE} in the directory (a .bin checkpoint?)")
    tensors: dict[str, FileTensor] = {}
    for file in files:
        tensors.update(_read_header(directory / file))
    return tensors


def _read_header(path: Path) -> dict[str, FileTensor]:
    """The safetensors header: u64le length, then JSON {name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    data_start = 8 + length
    size = path.stat().st_size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= size - data_start:
            raise StateFileError(f"{path}: tensor {name!r} lies outside the file; the file is truncated, re-download it")
        tensors[name] = FileTensor(path, entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end)
    return tensors


def _candidates(names: tuple[str, ...], prefix: str) -> list[str]:
    """A parameter's names as files may hold them, in transformers' order of preference (a checkpoint of the
    base model may lack the head's `prefix.`)."""
    return [candidate for name in names for candidate in (name, name.removeprefix(f"{prefix}.") if prefix else name)]


def _chunks(source: FileTensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The tensor's elements in row-major runs of CHUNK_ELEMENTS, cast to the dtype the model loads them in."""
    file_dtype = FILE_DTYPES.get(source.dtype)
    if file_dtype is None:
        raise NotStreamable(f"tensor dtype {source.dtype} is not a plain float dtype")
    itemsize = torch.empty((), dtype=file_dtype).element_size()
    if (source.end - source.start) != math.prod(source.shape) * itemsize:
        raise StateFileError(f"{source.path}: a {source.dtype} tensor of shape {list(source.shape)} has the wrong byte length")
    for raw in raw_chunks(source, CHUNK_ELEMENTS * itemsize):
        yield torch.frombuffer(raw, dtype=file_dtype).to(dtype)


def raw_chunks(source: FileTensor, size: int) -> Iterator[bytearray]:
    """The tensor's bytes as stored, in runs of `size` (plain reads: a memory map would keep every page
    read resident)."""
    fd = os.open(source.path, os.O_RDONLY)
    try:
        for first in range(source.start, source.end, size):
            length = min(size, source.end - first)
            raw = bytearray(os.pread(fd, length, first))
            if len(raw) != length:
                raise StateFileError(f"{source.path} is truncated; re-download it")
            yield raw
    finally:
        os.close(fd)


def _meta_model(directory: Path, tensors: dict[str, FileTensor]) -> tuple[nn.Module, torch.dtype]:
    """The model config.json describes, on the meta device (no weights), and the dtype from_pretrained
    (dtype="auto") gives its parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, "quantization_config", None) is not None:
        raise NotStreamable("the model is quantized")
    if _converted_while_loading(config.model_type):
        raise NotStreamable(f"transformers converts {config.model_type} checkpoints while loading them")
    dtype = getattr(config, "dtype", None) or _first_float_dtype(directory, tensors)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if _dtype_plan(model, dtype):
        raise NotStreamable(f"{type(model).__name__} keeps some modules in float32")
    return model, dtype


def _converted_while_loading(model_type: str) -> bool:
    """Whether transformers renames or fuses this model type's checkpoint tensors (MoE experts, ...)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers before 5 converts no checkpoint
        return False
    return bool(get_checkpoint_conversion_mapping(model_type))


def _dtype_plan(model: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Modules from_pretrained keeps in float32 whatever the model's dtype."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    return get_plan(dtype) if get_plan is not None else {}


def _first_float_dtype(directory: Path, tensors: dict[str, FileTensor]) -> torch.dtype:
    """transformers' rule when config.json names no dtype: the first float tensor of the first file."""
    from safetensors import safe_open

    first = min(tensor.path for tensor in tensors.values())
    with safe_open(str(first), framework="pt") as handle:
        for name in handle.keys():
            if tensors[name].dtype in FILE_DTYPES:
                return FILE_DTYPES[tensors[name].dtype]
    return torch.float32
