"""hash, replay, audit --replay and export read the base model from its files and give what the loaded model gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from swarmtune import entries, identity, ledger, ledgerfile, statefiles
from swarmtune.client.export import ExportError, export_model
from swarmtune.entries import Attestation, Genesis
from swarmtune.modelbuild import build_tokenizer
from swarmtune.models import load_model
from swarmtune.replay import ReplayError, replay, replay_replica, replica_from_files
from swarmtune.state import build_plan, master_from_model, state_hash, write_weights
from tests.support.cli_runner import run_cli
from tests.support.replay_ledger import build_ledger
from tests.support.tiny_models import tiny_llama


def base_dir(directory: Path, *, shard: bool = False, seed: int = 0) -> Path:
    """A tied bf16 tiny Llama (2 layers) saved as workers load it: safetensors (sharded or not) and tokenizer."""
    tiny_llama(seed=seed, tie=True).to(torch.bfloat16).save_pretrained(str(directory), max_shard_size="20KB" if shard else "5GB")
    build_tokenizer(directory)
    return directory


def loaded(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")


def verified_ledger(model: torch.nn.Module) -> list[entries.StoredEntry]:
    return [entry for _, entry in ledger.walk(build_ledger(model))]


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files, by name."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_replay_from_files_equals_replay_of_the_loaded_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard: bool) -> None:
    directory = base_dir(tmp_path / "model", shard=shard)
    model = loaded(directory)
    verified = verified_ledger(model)
    monkeypatch.setattr(statefiles, "CHUNK_ELEMENTS", 1000)  # every tensor read in several chunks
    seen: list[bytes] = []
    streamed = replay_replica(replica_from_files(directory, verified[0].entry.body), verified,  # type: ignore[arg-type]
                              on_iteration=lambda replica, _: seen.append(replica.state_hash()))
    reference = [replay(model, verified, until=t).state_hash for t in (1, 2, 3)]
    assert seen == reference and streamed.state_hash == reference[-1]
    for a, b in zip(streamed.replica.state.q, replay(model, verified).replica.state.q):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_replica_from_files_refuses_another_base_model(tmp_path: Path) -> None:
    genesis = verified_ledger(loaded(base_dir(tmp_path / "model")))[0].entry.body
    assert isinstance(genesis, Genesis)
    with pytest.raises(ReplayError, match="hashes to .* genesis records|not the job's base model"):
        replica_from_files(base_dir(tmp_path / "other", seed=1), genesis)
    untied = tmp_path / "untied"
    tiny_llama(tie=False).to(torch.bfloat16).save_pretrained(str(untied))
    with pytest.raises(ReplayError, match="lm_head.weight|embed_tokens.weight"):
        replica_from_files(untied, genesis)


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_streamed_export_equals_save_pretrained_of_the_replayed_model(tmp_path: Path, shard: bool) -> None:
    directory = base_dir(tmp_path / "model", shard=shard)
    model = loaded(directory)
    verified = verified_ledger(model)
    exported = export_model(directory, verified, tmp_path / "out", iteration=2)
    replayed = replay(model, verified, until=2)
    assert exported.state_hash == replayed.state_hash and exported.dtype == "bfloat16"
    # The export as it was: the loaded model's weights overwritten by the replayed state, save_pretrained.
    write_weights(model, replayed.replica.state)
    model.save_pretrained(str(tmp_path / "reference"))
    ours, reference = file_tensors(tmp_path / "out"), file_tensors(tmp_path / "reference")
    assert sorted(ours) == sorted(reference) and "lm_head.weight" not in ours
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype == torch.bfloat16 and torch.equal(ours[name], tensor), name
    assert (tmp_path / "out" / statefiles.INDEX_FILE).is_file() == shard
    if shard:
        index = json.loads((tmp_path / "out" / statefiles.INDEX_FILE).read_text())
        assert index["weight_map"] == json.loads((directory / statefiles.INDEX_FILE).read_text())["weight_map"]
    reloaded, _ = load_model(tmp_path / "out")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # tied as the base model is
    for (name, ours_param), (_, param) in zip(reloaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(ours_param, param), name
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "swarmtune.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_export_refuses_files_that_are_not_the_base_model(tmp_path: Path) -> None:
    verified = verified_ledger(loaded(base_dir(tmp_path / "model")))
    with pytest.raises(ReplayError, match="hashes to .* genesis records|not the job's base model"):
        export_model(base_dir(tmp_path / "other", seed=1), verified, tmp_path / "out")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ExportError, match="no tensor 'model.layers.2.*pass the job's base model"):
        export_model(tmp_path / "other", verified, tmp_path / "out2")


def test_export_of_a_bin_checkpoint_loads_and_saves(tmp_path: Path) -> None:
    directory = base_dir(tmp_path / "model")
    model = loaded(directory)
    verified = verified_ledger(model)
    torch.save(file_tensors(directory), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    exported = export_model(directory, verified, tmp_path / "out")
    assert exported.state_hash == replay(model, verified).state_hash
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_hash_command_streams_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    directory = base_dir(tmp_path / "model")
    model = loaded(directory)
    expected = state_hash(master_from_model(model, build_plan(model, "dense")))

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("hash loaded the model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    assert run_cli(monkeypatch, "hash", "--model", str(directory), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["state_hash"] == expected.hex() and printed["dtype"] == "bfloat16"
    assert printed["parameters"] == sum(p.numel() for p in model.parameters())


def test_replay_and_audit_commands_read_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    directory = base_dir(tmp_path / "model")
    model = loaded(directory)
    coordinator, worker = identity.generate_key(), identity.generate_key()
    stored = build_ledger(model, coordinator=coordinator, worker=worker)
    final = replay(model, [entry for _, entry in ledger.walk(stored)]).state_hash
    attestation = entries.sign_record(worker, Attestation("replay-test", 3, final, identity.public_key_bytes(worker)))
    stored.append(entries.seal(coordinator, entries.next_entry(entries.parse_entry(stored[-1]), attestation, 4)))
    ledgerfile.write(tmp_path / "ledger.bin", stored)

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("the command loaded the model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with monkeypatch.context() as patch:
        assert run_cli(patch, "replay", "--ledger", str(tmp_path / "ledger.bin"), "--model", str(directory), "--json") == 0
    assert json.loads(capsys.readouterr().out)["state_hash"] == final.hex()
    assert run_cli(monkeypatch, "audit", "--ledger", str(tmp_path / "ledger.bin"), "--replay", "--model", str(directory), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["final_state_hash"] == final.hex() and report["attestations_checked"] == 1
