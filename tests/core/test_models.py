"""Model building, resolution and loading through the real from_pretrained path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from swarmtune import models
from swarmtune.modelbuild import CHARACTERS, build_random_model, build_tokenizer, portable_uniform_init
from swarmtune.models import ModelResolutionError, load_model, resolve_model
from tests.support.tiny_models import SMALL_SHAPE


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tokenizer_round_trips_every_character(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tokenizer(CHARACTERS).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(CHARACTERS) + 1  # one token per character
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CHARACTERS


def test_tokenizer_pads_left_and_maps_unknown_characters(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    batch = tokenizer(["23+45=", "a>"], padding=True)
    assert tokenizer.padding_side == "left"
    assert batch.input_ids[1][:4] == [tokenizer.pad_token_id] * 4
    assert batch.attention_mask[1] == [0, 0, 0, 0, 1, 1, 1]
    assert tokenizer("é").input_ids == [tokenizer.bos_token_id, tokenizer.unk_token_id]


def test_tokenizer_chat_template(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text == "user: 2+2?\nassistant: "


def test_random_model_loads_and_generates(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.training
    assert not any(param.requires_grad for param in model.parameters())
    assert model.dtype == torch.float32
    assert model.config.model_type == "llama"
    encoded = tokenizer(["12+34=", "abc>"], return_tensors="pt", padding=True)
    output = model.generate(**encoded, max_new_tokens=3, do_sample=False)
    assert output.shape == (2, encoded.input_ids.shape[1] + 3)


def test_random_model_is_all_plain_linear_layers(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir)
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert all(linear.bias is None for linear in linears)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = build_random_model(tmp_path / "a", seed=3, **SMALL_SHAPE)
    second = build_random_model(tmp_path / "b", seed=3, **SMALL_SHAPE)
    other = build_random_model(tmp_path / "c", seed=4, **SMALL_SHAPE)
    assert file_sha256(first / "model.safetensors") == file_sha256(second / "model.safetensors")
    assert file_sha256(first / "model.safetensors") != file_sha256(other / "model.safetensors")


def test_init_values_are_pinned() -> None:
    # Golden values: SHAKE-256 bytes as little-endian int16 times 2^-20, the same on every machine.
    values = portable_uniform_init("model.layers.0.mlp.up_proj.weight", (2, 3), seed=0)
    assert values.tolist() == [[14047 / 2**20, 19135 / 2**20, -20082 / 2**20], [15074 / 2**20, 7930 / 2**20, 13889 / 2**20]]


def test_bfloat16_tied_model(tmp_path: Path) -> None:
    path = build_random_model(tmp_path, dtype="bfloat16", tie_word_embeddings=True, **SMALL_SHAPE)
    model, _ = load_model(path)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_load_model_dtype_override(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_load_model_pads_with_eos_when_the_tokenizer_has_no_pad(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, tokenizer = load_model(tiny_model_dir)
    tokenizer.pad_token = None
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    tokenizer.save_pretrained(str(tmp_path))
    model, reloaded = load_model(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token
    assert model.generation_config.pad_token_id == reloaded.eos_token_id


def test_resolve_local_directory(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "~/no-such-model-dir/x/y"])
def test_resolve_missing_directory_says_what_to_pass(spec: str) -> None:
    with pytest.raises(ModelResolutionError, match="no such directory"):
        resolve_model(spec)


def test_resolve_rejects_a_file_and_a_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelResolutionError, match="pass the model's directory"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_unknown_builtin() -> None:
    with pytest.raises(ModelResolutionError, match="builtin:tiny"):
        resolve_model("builtin:huge")


def test_resolve_hub_id_without_network_says_to_pass_a_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def offline(repo_id: str, **kwargs: object) -> str:
        calls.append(repo_id)
        raise OSError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(ModelResolutionError, match="pass its local directory"):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct", cache_dir=tmp_path)
    assert calls == ["Qwen/Qwen2.5-0.5B-Instruct"]


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARMTUNE_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SWARMTUNE_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "swarmtune"
