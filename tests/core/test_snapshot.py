"""Snapshots: the state part is exactly what the state hash hashes; loading verifies as it streams, from a file or HTTP."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterator

import pytest
import torch

from swarmtune import entries
from swarmtune.entries import Checkpoint, StoredEntry
from swarmtune.state import Q_DTYPE, MasterState, state_hash, tensor_spec
from swarmtune.snapshot import (
    MAGIC,
    SnapshotError,
    SnapshotHeader,
    checkpoint_for,
    encode_header,
    load_into,
    read_header,
    restore_from,
    write_snapshot,
)
from tests.support.file_server import serving
from tests.support.ledger_factory import ChainBuilder


def a_state(seed: int) -> MasterState:
    generator = torch.Generator().manual_seed(seed)
    specs = (tensor_spec("a.weight", (5, 3), 20, "lowrank"), tensor_spec("b.bias", (7,), -3, "dense"))
    q = tuple(torch.randint(-(2**30), 2**30, s.shape, generator=generator, dtype=torch.int64).to(Q_DTYPE) for s in specs)
    return MasterState(specs, q)


def zeros_like(state: MasterState) -> MasterState:
    return MasterState(state.specs, tuple(torch.zeros_like(q) for q in state.q))


def snapshot_bytes(state: MasterState, header: SnapshotHeader) -> bytes:
    out = io.BytesIO()
    assert write_snapshot(out, header, state) == state_hash(state)
    return out.getvalue()


HEADER = SnapshotHeader("job-snap", 4, bytes(range(32)))


def test_the_state_part_is_what_the_state_hash_hashes_and_loads_in_place() -> None:
    state = a_state(1)
    data = snapshot_bytes(state, HEADER)
    head = encode_header(HEADER)
    assert data.startswith(MAGIC) and data.startswith(head)
    assert hashlib.sha256(data[len(head):]).digest() == state_hash(state)
    stream = io.BytesIO(data)
    assert read_header(stream) == HEADER
    target = zeros_like(state)
    pointers = [q.data_ptr() for q in target.q]
    load_into(stream, target, state_hash(state))
    assert all(torch.equal(a, b) for a, b in zip(target.q, state.q))
    assert [q.data_ptr() for q in target.q] == pointers  # written into the tensors given, no second copy


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:-5], "truncated: it ends inside tensor b.bias"),
        (lambda d: d + b"\x00", "bytes after the last tensor"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "its checkpoint records"),
        (lambda d: b"X" + d[1:], "not a swarmtune snapshot"),
    ],
)
def test_a_damaged_snapshot_is_refused(damage: object, message: str) -> None:
    state = a_state(2)
    stream = io.BytesIO(damage(snapshot_bytes(state, HEADER)))  # type: ignore[operator]
    with pytest.raises(SnapshotError, match=message):
        read_header(stream)
        load_into(stream, zeros_like(state), state_hash(state))


def test_another_plan_is_refused_at_its_header() -> None:
    state = a_state(3)
    other = MasterState((state.specs[0], tensor_spec("b.bias", (7,), -2, "dense")), zeros_like(state).q)
    stream = io.BytesIO(snapshot_bytes(state, HEADER))
    read_header(stream)
    with pytest.raises(SnapshotError, match="tensor b.bias's header differs from the job's tensor plan"):
        load_into(stream, other, state_hash(state))


def checkpointed_ledger(state_hash_: bytes) -> tuple[ChainBuilder, list[StoredEntry]]:
    chain = ChainBuilder("job-snap", workers=2)
    chain.add(chain.iteration())
    chain.add(chain.iteration())
    attestations = tuple(chain.attestation(w, 2, state_hash_) for w in chain.workers)
    chain.add(Checkpoint(2, state_hash_, attestations, 2))
    return chain, [entries.parse_entry(s) for s in chain.stored]


def test_the_header_must_name_a_checkpoint_of_this_job() -> None:
    state = a_state(4)
    _, ledger_entries = checkpointed_ledger(state_hash(state))
    named = SnapshotHeader("job-snap", 2, ledger_entries[-1].hash)
    assert checkpoint_for(named, "job-snap", ledger_entries).state_hash == state_hash(state)
    with pytest.raises(SnapshotError, match="of job 'job-snap', this job is 'other'"):
        checkpoint_for(named, "other", ledger_entries)
    with pytest.raises(SnapshotError, match=r"no checkpoint entry .* of iteration 1 \(checkpointed iterations: \[2\]\)"):
        checkpoint_for(SnapshotHeader("job-snap", 1, ledger_entries[-1].hash), "job-snap", ledger_entries)
    with pytest.raises(SnapshotError, match="no checkpoint entry"):
        checkpoint_for(SnapshotHeader("job-snap", 2, bytes(32)), "job-snap", ledger_entries)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server over tmp_path: its base URL."""
    with serving(tmp_path) as url:
        yield url


def test_restore_from_a_file_and_over_http(tmp_path: Path, served: str) -> None:
    state = a_state(5)
    _, ledger_entries = checkpointed_ledger(state_hash(state))
    (tmp_path / "snap.bin").write_bytes(snapshot_bytes(state, SnapshotHeader("job-snap", 2, ledger_entries[-1].hash)))
    for source in (str(tmp_path / "snap.bin"), f"{served}/snap.bin"):
        target = zeros_like(state)
        assert restore_from(source, "job-snap", ledger_entries, target) == 2
        assert state_hash(target) == state_hash(state)
    with pytest.raises(SnapshotError, match="cannot fetch the snapshot .*404"):
        restore_from(f"{served}/missing.bin", "job-snap", ledger_entries, zeros_like(state))
    with pytest.raises(SnapshotError, match="cannot open the snapshot"):
        restore_from(str(tmp_path / "missing.bin"), "job-snap", ledger_entries, zeros_like(state))
