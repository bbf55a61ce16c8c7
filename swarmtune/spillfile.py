"""Int32 tensors spilled to an unlinked temporary file, written once and read back by element ranges."""

from __future__ import annotations

import os
import tempfile
from typing import Iterable

import numpy
import torch

from swarmtune.fixedpoint import Q_DTYPE

# Each element as the state hash serializes Q: little-endian int32 (i32le).
WIRE = numpy.dtype("<i4")


class SpillFile:
    """Tensors' flat elements, row-major i32le, one after the other, each under its key (its index in a
    master state), in a file that is unlinked at creation: the OS frees it when the process ends,
    however it ends. Reads are plain preads into fresh buffers: the page cache holds what is hot, the
    process does not. A tensor is written once, whole, and never changes after."""

    def __init__(self, directory: str | None = None) -> None:
        self._directory = directory or tempfile.gettempdir()  # named in errors: the file itself has no name
        self._file = tempfile.TemporaryFile(prefix="swarmtune-spill-", dir=directory)
        self._offsets: dict[int, tuple[int, int]] = {}  # key -> (byte offset, elements)
        self._end = 0

    def __contains__(self, key: object) -> bool:
        return key in self._offsets

    def write(self, key: int, runs: Iterable[torch.Tensor]) -> None:
        """Append tensor `key` from its consecutive row-major runs (Q_DTYPE, on any device)."""
        if key in self._offsets:
            raise ValueError(f"tensor {key} is spilled already: a spilled tensor is written once")
        fd, start, elements = self._file.fileno(), self._end, 0
        try:
            for run in runs:
                if run.dtype != Q_DTYPE:
                    raise TypeError(f"a spill file holds {Q_DTYPE} runs, got {run.dtype}")
                data = memoryview(run.detach().cpu().contiguous().numpy().astype(WIRE, copy=False)).cast("B")
                done, first = 0, start + elements * WIRE.itemsize
                while done < len(data):  # at explicit offsets: a failed write leaves nothing to shift the next
                    done += os.pwrite(fd, data[done:], first + done)
                elements += len(data) // WIRE.itemsize
        except OSError as exc:
            raise OSError(
                exc.errno, f"spilling a tensor to {self._directory} failed ({exc.strerror}): free space there or point TMPDIR at a disk with room"
            ) from None
        self._offsets[key] = (start, elements)
        self._end = start + elements * WIRE.itemsize

    def read(self, key: int, start: int, stop: int) -> torch.Tensor:
        """Flat elements start..stop of tensor `key` (Q_DTYPE, a fresh host tensor)."""
        offset, elements = self._offsets[key]
        if not 0 <= start <= stop <= elements:
            raise IndexError(f"elements {start}..{stop} are outside spilled tensor {key} of {elements}")
        out = numpy.empty(stop - start, dtype=WIRE)
        view, done, first = memoryview(out).cast("B"), 0, offset + start * WIRE.itemsize
        while done < len(view):  # one read returns at most ~2 GB (Linux): a whole large tensor takes several
            got = os.preadv(self._file.fileno(), [view[done:]], first + done)
            if got == 0:
                raise OSError(f"the spill file in {self._directory} ended {len(view) - done} bytes early: was it truncated?")
            done += got
        return torch.from_numpy(out.astype(out.dtype.newbyteorder("="), copy=False))

    def close(self) -> None:
        self._file.close()
