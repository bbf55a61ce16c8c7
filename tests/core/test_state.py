"""Master state: canonical order, tied weights once, plans, derived weights and the state hash."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from swarmtune import state as st
from tests.support.tiny_models import tiny_llama


def test_canonical_order_and_tied_weights_once() -> None:
    model = tiny_llama(tie=True)
    names = [name for name, _ in st.canonical_parameters(model)]
    assert names == sorted(names, key=str.encode)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names  # tied: smallest name
    untied = [name for name, _ in st.canonical_parameters(tiny_llama(tie=False))]
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(untied)


def test_plans() -> None:
    model = tiny_llama(tie=True)
    dense = st.build_plan(model, "dense")
    assert set(dense.values()) == {"dense"}
    lowrank = st.build_plan(model, "lowrank")
    assert lowrank["model.layers.0.self_attn.q_proj.weight"] == "lowrank"
    assert lowrank["lm_head.weight"] == "frozen"  # tied to the embedding: not one Linear's own matrix
    assert lowrank["model.norm.weight"] == "frozen"
    assert st.build_plan(model, "lowrank", "dense")["model.norm.weight"] == "dense"
    with pytest.raises(ValueError, match="lowrank_others"):
        st.build_plan(model, "lowrank", "sometimes")


def test_genesis_state_reproduces_the_model_weights() -> None:
    model = tiny_llama()
    original = {name: p.detach().clone() for name, p in st.canonical_parameters(model)}
    state = st.master_from_model(model, st.build_plan(model, "dense"))
    st.write_weights(model, state)
    assert all(q.dtype == st.Q_DTYPE == torch.int32 for q in state.q)
    for spec, (name, param) in zip(state.specs, st.canonical_parameters(model)):
        exact = original[name].abs() >= 2.0 ** (24 - spec.exponent)  # float32 weights: 24 bits above 2^-F
        assert exact.any() and torch.equal(param[exact], original[name][exact]), name
        assert (param.double() - original[name].double()).abs().max() <= 2.0 ** -(spec.exponent + 1), name


def test_row_chunks_cover_whole_rows_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "CHUNK_ELEMENTS", 100)
    assert st.row_chunks((7, 30)) == [(0, 90), (90, 180), (180, 210)]
    assert st.row_chunks((3, 250)) == [(0, 250), (250, 500), (500, 750)]  # a row above the bound: one row
    assert st.row_chunks((230,)) == [(0, 100), (100, 200), (200, 230)]
    assert st.row_chunks(()) == [(0, 1)] and st.row_chunks((0, 5)) == [(0, 0)]


def test_chunked_genesis_derive_and_hash_equal_whole_tensor_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    plan = st.build_plan(model, "dense")
    whole = st.master_from_model(model, plan)
    expected = st.state_hash(whole)
    monkeypatch.setattr(st, "CHUNK_ELEMENTS", 37)  # chunks of a few rows, uneven ends
    chunked = st.master_from_model(model, plan)
    assert all(torch.equal(a, b) for a, b in zip(whole.q, chunked.q))
    assert st.state_hash(chunked) == expected
    st.write_weights(model, chunked)
    for spec, q, (_, param) in zip(whole.specs, whole.q, st.canonical_parameters(model)):
        assert torch.equal(param, st.derive(q, spec.exponent, param.dtype))


def test_the_hash_serializes_int32_under_the_v2_domain() -> None:
    model = tiny_llama()
    state = st.master_from_model(model, st.build_plan(model, "dense"))
    digest = hashlib.sha256(b"swarmtune/state/v2\x00" + struct.pack("<I", len(state.specs)))
    for spec, q in zip(state.specs, state.q):
        digest.update(st.tensor_header(spec) + q.numpy().astype("<i4").tobytes())
    assert st.state_hash(state) == digest.digest()
    with pytest.raises(TypeError, match="int32"):
        st.q_bytes(state.q[0].to(torch.int64))


def test_hash_is_deterministic_and_sensitive() -> None:
    model = tiny_llama()
    plan = st.build_plan(model, "dense")
    first = st.master_from_model(model, plan)
    second = st.master_from_model(tiny_llama(), plan)
    assert st.state_hash(first) == st.state_hash(second)
    changed = first.clone()
    changed.q[3].view(-1)[7] += 1
    assert st.state_hash(changed) != st.state_hash(first)
    assert st.state_hash(st.master_from_model(tiny_llama(seed=1), plan)) != st.state_hash(first)
