"""The Qwen2-shaped builder the scale bench uses: tied, bf16, q/k/v biases, tokenizer padded to the vocab."""

from __future__ import annotations

from pathlib import Path

import torch

from swarmtune.backends.perturbation import uses_lowrank_batching
from swarmtune.modelbuild import build_qwen2_model
from swarmtune.models import load_model
from swarmtune.state import build_plan, master_from_model

SHAPE = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 64, "vocab": 300}


def test_qwen2_shape_is_tied_bf16_with_biases_and_a_padded_tokenizer(tmp_path: Path) -> None:
    model, tokenizer = load_model(build_qwen2_model(tmp_path / "m", **SHAPE))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # 2 KV heads of 8
    assert len(tokenizer) == model.config.vocab_size == SHAPE["vocab"]
    assert tokenizer.decode([SHAPE["vocab"] - 1]) == f"<fill_{SHAPE['vocab'] - 1}>"
    assert tokenizer.decode(tokenizer("12*3=")["input_ids"], skip_special_tokens=True) == "12*3="


def test_qwen2_shape_batches_lowrank_and_rebuilds_byte_identical(tmp_path: Path) -> None:
    first = build_qwen2_model(tmp_path / "a", **SHAPE)
    second = build_qwen2_model(tmp_path / "b", **SHAPE)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    model, _ = load_model(first)
    state = master_from_model(model, build_plan(model, "lowrank"))
    treatments = {spec.name: spec.treatment for spec in state.specs}
    assert treatments["lm_head.weight"] == "frozen"  # the tied embedding: not a Linear of its own
    assert treatments["model.layers.0.self_attn.q_proj.bias"] == "frozen"
    assert uses_lowrank_batching(state)
