"""Snapshots (PROTOCOL §5.9): a header naming a checkpoint entry, then exactly the bytes its state hash hashes."""

from __future__ import annotations

import hashlib
import http.client
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import torch

from swarmtune.entries import HASH_BYTES, Checkpoint, StoredEntry
from swarmtune.state import Q_DTYPE, MasterState, q_bytes, row_chunks, state_preamble, tensor_header

MAGIC = b"swarmtune/snapshot/v1\x00"
MAX_JOB_ID_BYTES = 1024
URL_TIMEOUT_S = 60.0
# Q as the snapshot stores it: little-endian, Q_DTYPE's width.
Q_WIRE = np.dtype(torch.empty(0, dtype=Q_DTYPE).numpy().dtype).newbyteorder("<")


class SnapshotError(Exception):
    """The snapshot cannot be used; the message says why (a worker then replays from genesis)."""


@dataclass(frozen=True)
class SnapshotHeader:
    """Which job, iteration and checkpoint entry (by its entry hash) the state that follows is of."""

    job_id: str
    iteration: int
    checkpoint_hash: bytes


def encode_header(header: SnapshotHeader) -> bytes:
    job = header.job_id.encode()
    return MAGIC + struct.pack("<I", len(job)) + job + struct.pack("<Q", header.iteration) + header.checkpoint_hash


def read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    """`size` bytes of `stream`, or SnapshotError naming `what` was cut short."""
    parts, left = [], size
    while left:
        part = stream.read(left)
        if not part:
            raise SnapshotError(f"the snapshot is truncated: it ends inside {what} ({size - left} of {size} bytes)")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_header(stream: BinaryIO) -> SnapshotHeader:
    if read_exact(stream, len(MAGIC), "the magic") != MAGIC:
        raise SnapshotError(f"not a swarmtune snapshot: it does not start with {MAGIC!r}")
    (length,) = struct.unpack("<I", read_exact(stream, 4, "the header"))
    if length > MAX_JOB_ID_BYTES:
        raise SnapshotError(f"the header names a {length}-byte job id; not a snapshot this version writes")
    try:
        job_id = read_exact(stream, length, "the header").decode()
    except UnicodeDecodeError:
        raise SnapshotError("the header's job id is not UTF-8") from None
    (iteration,) = struct.unpack("<Q", read_exact(stream, 8, "the header"))
    return SnapshotHeader(job_id, iteration, read_exact(stream, HASH_BYTES, "the header"))


def write_snapshot(out: BinaryIO, header: SnapshotHeader, state: MasterState) -> bytes:
    """Write the header and the state, tensor by tensor in row chunks; the state hash of what was written."""
    out.write(encode_header(header))
    digest = hashlib.sha256()
    for part in state_parts(state):
        out.write(part)
        digest.update(part)
    return digest.digest()


def state_parts(state: MasterState) -> Iterator[bytes | memoryview]:
    """The state part in pieces no larger than a row chunk, one at a time (Q is never copied whole, and
    a spilled tensor is read back a chunk at a time)."""
    yield state_preamble(len(state.specs))
    for index, spec in enumerate(state.specs):
        yield tensor_header(spec)
        for _, run in state.runs(index):
            yield q_bytes(run)


def load_into(stream: BinaryIO, state: MasterState, expected_hash: bytes) -> None:
    """Read the state part of `stream` into `state`'s resident Q in place (chunk by chunk, hashing as it
    goes); a spilled (frozen) tensor's bytes are hashed and compared with its spill, which they must
    equal (no update ever changes a frozen tensor). SnapshotError if its layout is not `state`'s plan,
    it is cut short or longer, a frozen tensor differs, or its hash is not `expected_hash` (the
    state's contents are then undefined: rebuild it)."""
    digest = hashlib.sha256()

    def expect(wanted: bytes, what: str) -> None:
        got = read_exact(stream, len(wanted), what)
        if got != wanted:
            raise SnapshotError(f"{what} differs from the job's tensor plan: the snapshot is of another model or damaged")
        digest.update(got)

    expect(state_preamble(len(state.specs)), "the state header")
    for index, spec in enumerate(state.specs):
        expect(tensor_header(spec), f"tensor {spec.name}'s header")
        for start, stop in row_chunks(spec.shape):
            data = read_exact(stream, (stop - start) * Q_WIRE.itemsize, f"tensor {spec.name}")
            digest.update(data)
            q = torch.from_numpy(np.frombuffer(data, dtype=Q_WIRE).astype(Q_WIRE.newbyteorder("=")))
            if not state.spilled(index):
                state.resident(index).view(-1)[start:stop].copy_(q)
            elif not torch.equal(q, state.run(index, start, stop)):
                raise SnapshotError(f"frozen tensor {spec.name} differs from the base model's in the snapshot: it is damaged or forged")
    if stream.read(1):
        raise SnapshotError("the snapshot holds bytes after the last tensor: it is not of this job's tensor plan")
    found = digest.digest()
    if found != expected_hash:
        raise SnapshotError(f"the snapshot's state hashes to {found.hex()}, its checkpoint records {expected_hash.hex()}: it is damaged or forged")


def checkpoints_in(ledger_entries: Sequence[StoredEntry]) -> dict[int, StoredEntry]:
    """Checkpointed iteration -> its (newest) checkpoint entry."""
    return {e.entry.body.iteration: e for e in ledger_entries if isinstance(e.entry.body, Checkpoint)}


def checkpoint_for(header: SnapshotHeader, job_id: str, ledger_entries: Sequence[StoredEntry]) -> Checkpoint:
    """The checkpoint entry of `ledger_entries` the header names; SnapshotError if it is another job's or none."""
    if header.job_id != job_id:
        raise SnapshotError(f"the snapshot is of job {header.job_id!r}, this job is {job_id!r}")
    found = checkpoints_in(ledger_entries)
    entry = found.get(header.iteration)
    if entry is None or entry.hash != header.checkpoint_hash:
        raise SnapshotError(
            f"the ledger holds no checkpoint entry {header.checkpoint_hash.hex()[:16]} of iteration {header.iteration} "
            f"(checkpointed iterations: {sorted(found) or 'none'}); write a snapshot at one of them"
        )
    assert isinstance(entry.entry.body, Checkpoint)  # checkpoints_in keeps only those
    return entry.entry.body


def open_source(source: str) -> BinaryIO:
    """A snapshot's bytes as a stream: a local path, or an http(s) URL read as it arrives."""
    if source.startswith(("http://", "https://")):
        try:
            response: BinaryIO = urllib.request.urlopen(source, timeout=URL_TIMEOUT_S)
            return response
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SnapshotError(f"cannot fetch the snapshot {source}: {exc}") from None
    try:
        return open(source, "rb")
    except OSError as exc:
        raise SnapshotError(f"cannot open the snapshot {source}: {exc.strerror}") from None


def restore_from(source: str, job_id: str, ledger_entries: Sequence[StoredEntry], state: MasterState) -> int:
    """Load the snapshot at `source` into `state` once its header names a checkpoint of `ledger_entries`
    and its bytes hash to that checkpoint's state hash; the checkpoint's iteration."""
    with open_source(source) as stream:
        try:
            header = read_header(stream)
            checkpoint = checkpoint_for(header, job_id, ledger_entries)
            load_into(stream, state, checkpoint.state_hash)
        except (OSError, http.client.HTTPException) as exc:  # a connection dropped mid-stream
            raise SnapshotError(f"reading the snapshot {source} failed: {exc}") from None
    return checkpoint.iteration
