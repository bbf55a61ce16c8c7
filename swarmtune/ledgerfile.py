"""The portable ledger file: every stored entry, exactly, length-prefixed, with a sealing trailer."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from swarmtune.entries import ZERO_HASH, entry_hash
from swarmtune.ledger import Problem, Report, failed, verify_chain

# Layout (little-endian): MAGIC, u32 version, then per entry u32 length (>= 1) + the stored bytes,
# then the trailer: u32 0 (end mark), u64 entry count, the 32-byte hash of the last entry (zeros if
# none), and nothing after it. The trailer makes a cut at an entry boundary detectable.
MAGIC = b"SWTLEDGR"
VERSION = 1
MAX_ENTRY_BYTES = 1 << 28
_U32 = struct.Struct("<I")
_TRAILER = struct.Struct("<IQ32s")


class LedgerFileError(ValueError):
    """The bytes are not a complete, intact ledger file; the message says where."""


def header() -> bytes:
    return MAGIC + _U32.pack(VERSION)


def trailer(count: int, last_hash: bytes) -> bytes:
    return _TRAILER.pack(0, count, last_hash)


def record(stored: bytes) -> bytes:
    if not 0 < len(stored) <= MAX_ENTRY_BYTES:
        raise ValueError(f"an entry must be 1..{MAX_ENTRY_BYTES} bytes, got {len(stored)}")
    return _U32.pack(len(stored)) + stored


def chunks(stored_entries: Iterable[bytes]) -> Iterator[bytes]:
    """The file, piece by piece: header, one record per entry, trailer."""
    count, last = 0, ZERO_HASH
    yield header()
    for stored in stored_entries:
        yield record(stored)
        count, last = count + 1, entry_hash(stored)
    yield trailer(count, last)


def encode(stored_entries: Iterable[bytes]) -> bytes:
    return b"".join(chunks(stored_entries))


def decode(data: bytes) -> list[bytes]:
    """The stored entries of a ledger file's bytes; LedgerFileError if anything is off."""
    if data[: len(MAGIC)] != MAGIC:
        raise LedgerFileError("not a swarmtune ledger file (bad magic)")
    pos = len(MAGIC) + _U32.size
    if len(data) < pos:
        raise LedgerFileError("truncated in the header")
    (version,) = _U32.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise LedgerFileError(f"format version {version} is not supported (this swarmtune reads {VERSION})")
    items: list[bytes] = []
    while True:
        if len(data) < pos + _U32.size:
            raise LedgerFileError(f"truncated after {len(items)} entries (no end mark)")
        (length,) = _U32.unpack_from(data, pos)
        if length == 0:
            break
        end = pos + _U32.size + length
        if end > len(data):
            raise LedgerFileError(f"entry {len(items)} claims {length} bytes, past the end of the file")
        items.append(data[pos + _U32.size : end])
        pos = end
    if len(data) != pos + _TRAILER.size:
        raise LedgerFileError(f"trailer after entry {len(items) - 1} is {len(data) - pos} bytes, not {_TRAILER.size}")
    _, count, last_hash = _TRAILER.unpack_from(data, pos)
    if count != len(items):
        raise LedgerFileError(f"trailer counts {count} entries, the file holds {len(items)}")
    if last_hash != (entry_hash(items[-1]) if items else ZERO_HASH):
        raise LedgerFileError("trailer hash is not the hash of the last entry")
    return items


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise LedgerFileError(f"cannot read {path}: {exc.strerror}") from None


def read(path: Path) -> list[bytes]:
    return decode(_read_bytes(path))


def verify_bytes(data: bytes, coordinator_key: bytes | None = None) -> Report:
    """Verify a ledger file's bytes: format, then the chain. Never raises on bad bytes."""
    try:
        stored_entries = decode(data)
    except LedgerFileError as exc:
        return failed(Problem(None, "file", str(exc)))
    return verify_chain(stored_entries, coordinator_key)


def verify_file(path: Path, coordinator_key: bytes | None = None) -> Report:
    """Verify a ledger file; LedgerFileError only if it cannot be read at all."""
    return verify_bytes(_read_bytes(path), coordinator_key)


def write(path: Path, stored_entries: Iterable[bytes]) -> int:
    """Write entries (streamed) to `path` atomically; returns how many were written."""
    path = Path(path)
    pieces = 0
    fd, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for pieces, chunk in enumerate(chunks(stored_entries), start=1):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    return pieces - 2  # header and trailer
