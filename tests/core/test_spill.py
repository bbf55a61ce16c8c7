"""Frozen tensors' Q spilled to disk: the same hash, derived weights, updates and snapshots as resident Q, never read directly."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from swarmtune import state as state_module
from swarmtune.backends.perturbation import lowrank_deltas, perturbed_weights
from swarmtune.fixedpoint import Q_DTYPE
from swarmtune.noise import NoiseConfig
from swarmtune.replay import spilled_base
from swarmtune.seeds import population
from swarmtune.snapshot import SnapshotError, SnapshotHeader, load_into, read_header, write_snapshot
from swarmtune.spillfile import SpillFile
from swarmtune.state import MasterState, build_plan, master_from_model, q_bytes, state_hash, write_weights
from swarmtune.update import IterationUpdate, apply_iteration_, decay_integer
from tests.support.tiny_models import tiny_llama

NOISE = NoiseConfig("lowrank", "rademacher", rank=2)
MEMBERS = population(3, 1, 6, antithetic=True)
CHANGE = IterationUpdate(MEMBERS, (9_000_000, -9_000_000, 4_000_000, 1, -77_777, 5))


def resident_copy(state: MasterState) -> MasterState:
    """The same state with every tensor's Q in memory (how every state was held before the spill)."""
    return MasterState(state.specs, tuple(state.whole(index).clone() for index in range(len(state.specs))))


@pytest.fixture()
def spilled(monkeypatch: pytest.MonkeyPatch) -> MasterState:
    """A tied tiny Llama's low-rank state (others frozen), in chunks of a few rows: every tensor spans several."""
    monkeypatch.setattr(state_module, "CHUNK_ELEMENTS", 100)
    model = tiny_llama(tie=True)
    return master_from_model(model, build_plan(model, "lowrank"))


def frozen_indices(state: MasterState) -> list[int]:
    return [index for index, spec in enumerate(state.specs) if spec.treatment == "frozen"]


def test_a_spill_file_reads_back_any_range_of_what_was_written(tmp_path: Path) -> None:
    spill = SpillFile(str(tmp_path))
    first = torch.arange(-500, 500, dtype=Q_DTYPE) * 2_000_003
    spill.write(4, first.split(77))
    spill.write(1, [torch.tensor([2**31 - 1, -(2**31)], dtype=Q_DTYPE)])
    assert 4 in spill and 1 in spill and 0 not in spill
    assert torch.equal(spill.read(4, 0, 1000), first) and torch.equal(spill.read(4, 333, 334), first[333:334])
    assert spill.read(1, 0, 2).tolist() == [2**31 - 1, -(2**31)] and spill.read(4, 7, 7).numel() == 0
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing to clean up, whatever ends the process
    with pytest.raises(ValueError, match="written once"):
        spill.write(4, [first])
    with pytest.raises(IndexError, match="outside spilled tensor 1"):
        spill.read(1, 0, 3)
    with pytest.raises(TypeError, match="int32"):
        spill.write(2, [first.to(torch.int64)])
    spill.close()


def test_genesis_spills_exactly_the_frozen_tensors(spilled: MasterState) -> None:
    frozen = frozen_indices(spilled)
    names = {spilled.specs[index].name for index in frozen}
    assert "lm_head.weight" in names and "model.norm.weight" in names  # the tied embedding: the largest
    assert [q.is_meta for q in spilled.q] == [index in frozen for index in range(len(spilled.specs))]
    assert spilled.spill is not None and all(index in spilled.spill for index in frozen)
    model = tiny_llama(tie=True)
    dense = master_from_model(model, build_plan(model, "dense"))
    assert dense.spill is None and not any(q.is_meta for q in dense.q)
    assert master_from_model(model, build_plan(model, "lowrank", "dense")).spill is None


def test_spilled_and_resident_states_hash_and_derive_the_same(spilled: MasterState) -> None:
    resident = resident_copy(spilled)
    assert state_hash(spilled) == state_hash(resident)
    from_spilled, from_resident = tiny_llama(tie=True, seed=5), tiny_llama(tie=True, seed=6)
    write_weights(from_spilled, spilled)
    write_weights(from_resident, resident)
    for name, param in state_module.canonical_parameters(from_spilled):
        assert torch.equal(param, from_resident.get_parameter(name)), name


def test_updates_and_perturbations_never_read_a_frozen_tensor(spilled: MasterState, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same update (anchored decay included) and member weights as the resident state, with every
    read of the spill refused while they run: frozen tensors are neither written nor read."""
    resident = resident_copy(spilled)
    decay = decay_integer(0.05)
    resident_base, spilled_base_file = resident.clone(), spilled_base(spilled)
    assert spilled.spill is not None
    frozen = {index: spilled.whole(index).clone() for index in frozen_indices(spilled)}
    assert all(index not in spilled_base_file for index in frozen)  # decay never reads a frozen base either

    def refused(*_: object) -> torch.Tensor:
        raise AssertionError("a frozen tensor's spill was read")

    apply_iteration_(resident, CHANGE, NOISE, resident_base, decay)
    with monkeypatch.context() as patched:
        patched.setattr(spilled.spill, "read", refused)
        apply_iteration_(spilled, CHANGE, NOISE, spilled_base_file, decay)
        weights = list(perturbed_weights(spilled, MEMBERS[1], 40_000, NOISE, torch.float32))
        deltas = lowrank_deltas(spilled, MEMBERS, 40_000, NOISE, torch.float32, "cpu")
    assert state_hash(spilled) == state_hash(resident) != state_hash(resident_base)
    assert all(torch.equal(spilled.whole(index), before) for index, before in frozen.items())
    expected = list(perturbed_weights(resident, MEMBERS[1], 40_000, NOISE, torch.float32))
    assert [(i, s) for i, s, _ in weights] == [(i, s) for i, s, _ in expected] and all(i not in frozen for i, _, _ in weights)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(weights, expected))
    for a, b in zip(deltas, lowrank_deltas(resident, MEMBERS, 40_000, NOISE, torch.float32, "cpu")):
        assert a.module == b.module and torch.equal(a.a_t, b.a_t) and torch.equal(a.b_t, b.b_t)


def test_a_spilled_tensor_is_reachable_only_through_the_accessors(spilled: MasterState) -> None:
    index = frozen_indices(spilled)[0]
    with pytest.raises(NotImplementedError):
        spilled.q[index].view(-1)[0:4].to("cpu")  # a meta tensor: no data to read, never zeros
    with pytest.raises(ValueError, match="read it with MasterState.run"):
        q_bytes(spilled.q[index])
    with pytest.raises(ValueError, match="frozen and spilled"):
        spilled.resident(index)
    with pytest.raises(ValueError, match="exactly when it is spilled"):
        MasterState(spilled.specs, spilled.q)  # meta entries without their spill
    copy, moved = spilled.clone(), spilled.to("cpu")
    assert copy.spill is spilled.spill is moved.spill  # immutable: shared, not copied
    lowrank = next(i for i, spec in enumerate(spilled.specs) if spec.treatment == "lowrank")
    copy.resident(lowrank).view(-1)[0] += 1
    assert not torch.equal(copy.whole(lowrank), spilled.whole(lowrank)) and torch.equal(copy.whole(index), spilled.whole(index))


def test_a_snapshot_of_a_spilled_state_loads_and_checks_its_frozen_tensors(spilled: MasterState) -> None:
    """Written from the spill chunk by chunk, the state hash's bytes; loaded, resident tensors are written
    in place and frozen ones compared with the spill: a frozen tensor that differs is refused."""
    header = SnapshotHeader("job-spill", 3, bytes(32))
    apply_iteration_(spilled, CHANGE, NOISE)
    out = io.BytesIO()
    assert write_snapshot(out, header, spilled) == state_hash(spilled) == state_hash(resident_copy(spilled))
    model = tiny_llama(tie=True)
    target = master_from_model(model, build_plan(model, "lowrank"))
    stream = io.BytesIO(out.getvalue())
    read_header(stream)
    load_into(stream, target, state_hash(spilled))
    assert state_hash(target) == state_hash(spilled)
    forged = resident_copy(spilled)
    forged.q[frozen_indices(forged)[0]].view(-1)[3] += 1
    out = io.BytesIO()
    write_snapshot(out, header, forged)
    stream = io.BytesIO(out.getvalue())
    read_header(stream)
    with pytest.raises(SnapshotError, match="frozen tensor lm_head.weight differs"):
        load_into(stream, target, state_hash(forged))
