"""Export's files, streamed: derived weights written as safetensors tensor by tensor, in the base files' names
and shards, beside copies of the base directory's config and tokenizer files."""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from swarmtune.fixedpoint import derive
from swarmtune.state import MasterState
from swarmtune.statefiles import FILE_DTYPES, INDEX_FILE, FileTensor, StateFiles, raw_chunks

SAFETENSORS_DTYPES = {dtype: name for name, dtype in FILE_DTYPES.items()}
# Bytes per read when a tensor the state does not hold (a buffer) is copied unchanged.
COPY_BYTES = 1 << 24
# Base-directory files an export does not copy: weights, which it writes itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output file: derived from state tensor `state_index`, or (None) copied from `source`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    state_index: int | None
    source: FileTensor


def write_weight_files(model_dir: Path, files: StateFiles, state: MasterState, out: Path) -> None:
    """The weights of `state` derived in the model's dtype, one output file per base file (same names, an
    index when the base is sharded); each tensor the state lacks copied unchanged, a tie's copies skipped."""
    layout = output_layout(files, state)
    for file_name, tensors in layout.items():
        with open(out / file_name, "wb") as handle:
            write_safetensors(handle, tensors, state, files.dtype)
    if (model_dir / INDEX_FILE).is_file():
        weight_map = {tensor.name: file_name for file_name, tensors in layout.items() for tensor in tensors}
        total = sum(tensor.nbytes for tensors in layout.values() for tensor in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def output_layout(files: StateFiles, state: MasterState) -> dict[str, list[OutTensor]]:
    """Output file name -> its tensors in name order: the base files' layout, state tensors in the model's dtype."""
    position = {spec.name: index for index, spec in enumerate(state.specs)}
    derived = {source.file_name: position[source.name] for source in files.sources}
    skipped = {name for source in files.sources for name in source.also}
    itemsize = torch.empty((), dtype=files.dtype).element_size()
    layout: dict[str, list[OutTensor]] = {}
    for name in sorted(files.tensors):
        source = files.tensors[name]
        if name in skipped:
            continue
        index = derived.get(name)
        if index is None:
            tensor = OutTensor(name, source.dtype, source.shape, source.end - source.start, None, source)
        else:
            shape = state.specs[index].shape
            tensor = OutTensor(name, SAFETENSORS_DTYPES[files.dtype], shape, math.prod(shape) * itemsize, index, source)
        layout.setdefault(source.path.name, []).append(tensor)
    return dict(sorted(layout.items()))


def write_safetensors(handle: BinaryIO, tensors: list[OutTensor], state: MasterState, dtype: torch.dtype) -> None:
    """The safetensors format: u64le header length, the JSON header (padded to 8 bytes with spaces, as the
    safetensors library pads it), then each tensor's little-endian bytes in header order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    handle.write(struct.pack("<Q", len(text)) + text)
    for tensor in tensors:
        if tensor.state_index is None:
            for raw in raw_chunks(tensor.source, COPY_BYTES):
                handle.write(raw)
        else:
            _write_derived(handle, state, tensor.state_index, dtype)


def _write_derived(handle: BinaryIO, state: MasterState, index: int, dtype: torch.dtype) -> None:
    """derive(Q) of one state tensor, a row chunk at a time (what write_weights puts in a model)."""
    exponent = state.specs[index].exponent
    for _, run in state.runs(index):
        handle.write(derive(run, exponent, dtype).view(torch.uint8).numpy().data)


def copy_model_files(model_dir: Path, out: Path, exclude: tuple[str, ...]) -> None:
    """The base directory's config, generation config and tokenizer files: every top-level file but weights,
    hidden files and `exclude`."""
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in exclude:
            shutil.copyfile(path, out / path.name)
