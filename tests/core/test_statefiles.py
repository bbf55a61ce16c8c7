"""The genesis state streamed from a model directory's files equals the loaded model's, byte for byte."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swarmtune import statefiles
from swarmtune.modelbuild import build_tokenizer
from swarmtune.fixedpoint import Q_DTYPE
from swarmtune.state import build_plan, master_from_model, state_hash
from tests.support.tiny_models import tiny_llama

PLANS = [("dense", "frozen"), ("lowrank", "frozen"), ("lowrank", "dense")]


def saved(directory: Path, *, tie: bool, dtype: torch.dtype, shard: bool = False, seed: int = 0) -> Path:
    """A tiny Llama (2 layers, grouped-query attention) saved with save_pretrained."""
    model = tiny_llama(seed=seed, tie=tie).to(dtype)
    model.save_pretrained(str(directory), max_shard_size="20KB" if shard else "5GB")
    return directory


def loaded_base_state(directory: Path, family: str, others: str) -> statefiles.BaseState:
    """Today's reference: from_pretrained (as models.load_model loads it), then master_from_model + state_hash."""
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")
    state = master_from_model(model, build_plan(model, family, others))
    return statefiles.BaseState(state.specs, state_hash(state), model.dtype)


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_streamed_equals_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tie: bool, dtype: torch.dtype, shard: bool
) -> None:
    directory = saved(tmp_path, tie=tie, dtype=dtype, shard=shard)
    assert (directory / statefiles.INDEX_FILE).is_file() == shard
    # Small reads that do not divide the rows: every tensor spans several chunks.
    monkeypatch.setattr(statefiles, "CHUNK_ELEMENTS", 1000)
    for family, others in PLANS:
        streamed = statefiles.streamed_base_state(directory, family, others)
        assert streamed == loaded_base_state(directory, family, others), (family, others)
    if tie:
        names = [spec.name for spec in streamed.plan]
        assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
        assert "lm_head.weight" not in statefiles.file_tensors(directory)  # the tie's source alone is saved


@pytest.mark.parametrize("config_dtype", ["bfloat16", "float16", None], ids=["to-bf16", "to-fp16", "from-files"])
def test_dtype_the_model_loads_in(tmp_path: Path, config_dtype: str | None) -> None:
    """fp32 files under a config naming another dtype are cast as from_pretrained casts them; a config
    without a dtype takes the files' dtype."""
    directory = saved(tmp_path, tie=True, dtype=torch.float32, seed=3)
    edit_config(directory, dtype=config_dtype, torch_dtype=None)
    for family, others in PLANS[:2]:
        assert statefiles.streamed_base_state(directory, family, others) == loaded_base_state(directory, family, others)


def test_missing_tensor_is_a_clear_error(tmp_path: Path) -> None:
    directory = saved(tmp_path, tie=False, dtype=torch.float32)
    weights = load_file(str(directory / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(statefiles.StateFileError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        statefiles.streamed_base_state(directory, "dense", "frozen")


def test_shape_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    directory = saved(tmp_path, tie=False, dtype=torch.float32)
    edit_config(directory, intermediate_size=96)
    with pytest.raises(statefiles.StateFileError, match=r"mlp.down_proj.weight' has shape \[32, 64\] in the files"):
        statefiles.streamed_base_state(directory, "lowrank", "frozen")


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    directory = saved(tmp_path, tie=False, dtype=torch.float32)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(statefiles.StateFileError, match="truncated"):
        statefiles.streamed_base_state(directory, "dense", "frozen")


def test_bin_checkpoint_falls_back_to_loading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = saved(tmp_path, tie=True, dtype=torch.bfloat16)
    build_tokenizer(directory)
    reference = loaded_base_state(directory, "lowrank", "frozen")
    weights = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(weights, directory / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="swarmtune.statefiles"):
        found = statefiles.genesis_base_state(directory, "lowrank", "frozen")
    assert found == reference
    assert "loading the whole model" in caplog.text and "no model.safetensors" in caplog.text


def test_non_finite_weights_are_refused_as_when_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = saved(tmp_path, tie=False, dtype=torch.float32)
    weights = load_file(str(directory / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][-1, -1] = float("nan")
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(statefiles, "CHUNK_ELEMENTS", 1000)  # the NaN in the last of several chunks
    with pytest.raises(ValueError, match="NaN or infinity"):
        statefiles.streamed_base_state(directory, "dense", "frozen")
    with pytest.raises(ValueError, match="NaN or infinity"):
        statefiles.master_from_files(directory, build_plan(AutoModelForCausalLM.from_pretrained(str(directory)), "dense"))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("others", ["dense", "frozen"])
def test_master_from_files_equals_master_from_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tie: bool, others: str) -> None:
    """The same Q either way; frozen tensors (the tied embedding, norms) spilled, not resident, either way."""
    directory = saved(tmp_path, tie=tie, dtype=torch.bfloat16, shard=True)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")
    plan = build_plan(model, "lowrank", others)
    reference = master_from_model(model, plan)
    monkeypatch.setattr(statefiles, "CHUNK_ELEMENTS", 1000)
    state = statefiles.master_from_files(directory, plan)
    assert state.specs == reference.specs
    frozen = [spec.treatment == "frozen" for spec in state.specs]
    assert [q.is_meta for q in state.q] == [q.is_meta for q in reference.q] == frozen and any(frozen) == (others == "frozen")
    wholes = [(state.whole(i), reference.whole(i)) for i in range(len(state.specs))]
    assert all(a.dtype == b.dtype == Q_DTYPE and torch.equal(a, b) for a, b in wholes)
    assert state_hash(state) == statefiles.streamed_base_state(directory, "lowrank", others).state_hash
    with pytest.raises(statefiles.StateFileError, match="that the tensor plan does not list"):
        statefiles.master_from_files(directory, {name: kind for name, kind in plan.items() if "norm" not in name})
