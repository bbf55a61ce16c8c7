"""The genesis Q spilled to an unlinked temporary file: anchored decay reads it chunk by chunk."""

from __future__ import annotations

import os
import tempfile

import numpy
import torch

from swarmtune.state import MasterState, q_bytes, row_chunks

Q_BYTES = 4  # an i32le element, as the state hash serializes it


class BaseFile:
    """Every tensor's base Q, row-major i32le, one after the other, in a file that is unlinked at
    creation (the OS frees it when the process ends, however it ends). Reads are plain preads: the
    page cache holds what is hot, the process does not."""

    def __init__(self, state: MasterState, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="swarmtune-base-", dir=directory)
        self._offsets: list[int] = []
        offset = 0
        for spec, q in zip(state.specs, state.q):
            self._offsets.append(offset)
            flat = q.reshape(-1)
            for start, stop in row_chunks(spec.shape):
                self._file.write(q_bytes(flat[start:stop]))
            offset += q.numel() * Q_BYTES
        self._file.flush()

    def read(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Flat elements start..stop of tensor `index`, widened to int64."""
        size = (stop - start) * Q_BYTES
        raw = os.pread(self._file.fileno(), size, self._offsets[index] + start * Q_BYTES)
        if len(raw) != size:
            raise OSError(f"the base state's spill file returned {len(raw)} of {size} bytes: is its disk full or gone?")
        return torch.from_numpy(numpy.frombuffer(raw, dtype="<i4").astype(numpy.int64))

    def close(self) -> None:
        self._file.close()
