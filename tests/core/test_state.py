"""Master state: canonical order, tied weights once, plans, derived weights and the state hash."""

from __future__ import annotations

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
    for name, param in st.canonical_parameters(model):
        exact = original[name].abs() >= 2.0 ** (24 - 40)
        assert torch.equal(param[exact], original[name][exact]), name


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
