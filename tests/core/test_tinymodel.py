"""builtin:tiny: the pretraining recipe learns, builds are deterministic, the shipped weights install atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarmtune import tinymodel
from swarmtune.models import ModelResolutionError, load_model
from swarmtune.tasks.demo import addition_task, reversal_task
from swarmtune.tinymodel import (
    BUILD_FACTS,
    MANIFEST,
    TINY_NAME,
    WEIGHTS_DIR,
    TinyRecipe,
    build_tiny,
    content_hash,
    ensure_tiny,
    file_hashes,
    greedy_accuracy,
    read_manifest,
    shipped_facts,
    tiny_dir,
)

# A few seconds of training: enough to see the loss fall, far from the real recipe's skills.
REDUCED = TinyRecipe(
    hidden=32, layers=1, heads=2, intermediate=64, batch_size=32, warmup_steps=5, max_steps=30, check_examples=16
)


@pytest.fixture(scope="module")
def reduced_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("reduced"), REDUCED, progress=False)


def test_pretraining_lowers_the_loss(reduced_build: Path) -> None:
    report = read_manifest(reduced_build)["pretraining"]
    assert report["steps"] == REDUCED.max_steps
    assert report["final_loss"] < 0.8 * report["first_loss"]  # from uniform towards letter frequencies


def test_manifest_hashes_every_file(reduced_build: Path) -> None:
    manifest = read_manifest(reduced_build)
    assert manifest["files"] == file_hashes(reduced_build)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["content_hash"] == content_hash(manifest["files"])
    assert manifest["recipe"]["max_steps"] == REDUCED.max_steps


def test_build_loads_through_from_pretrained(reduced_build: Path) -> None:
    model, tokenizer = load_model(reduced_build)
    assert model.config.hidden_size == REDUCED.hidden
    assert tokenizer.padding_side == "left"


def test_same_recipe_gives_the_same_model(reduced_build: Path, tmp_path: Path) -> None:
    again = build_tiny(tmp_path, REDUCED, progress=False)
    assert read_manifest(again)["content_hash"] == read_manifest(reduced_build)["content_hash"]


def cached_copy(build: Path, root: Path) -> Path:
    """A cache root holding a copy of a finished build where ensure_tiny keeps its install."""
    shutil.copytree(build, tiny_dir(root))
    return root


def test_ensure_tiny_installs_the_shipped_weights_into_an_empty_cache(tmp_path: Path) -> None:
    installed = ensure_tiny(tmp_path)
    assert installed == tiny_dir(tmp_path)
    assert {path.name for path in installed.parent.iterdir()} == {TINY_NAME, f"{TINY_NAME}.lock"}  # no scratch left
    manifest = read_manifest(installed)
    assert {key: manifest[key] for key in BUILD_FACTS} == shipped_facts()
    model, _ = load_model(installed)
    shipped = load_file(str(WEIGHTS_DIR / f"{TINY_NAME}.safetensors"))
    assert all(torch.equal(model.get_parameter(name), tensor) for name, tensor in shipped.items())


def test_ensure_tiny_reuses_an_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_tiny(tmp_path)

    def no_reinstall(*args: object, **kwargs: object) -> Path:
        raise AssertionError("an installed model was installed again")

    monkeypatch.setattr(tinymodel, "install_tiny", no_reinstall)
    assert ensure_tiny(tmp_path) == tiny_dir(tmp_path)


def test_an_interrupted_install_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tinymodel, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny(tmp_path)
    assert [path.name for path in tiny_dir(tmp_path).parent.iterdir()] == [f"{TINY_NAME}.lock"]


def test_scratch_of_a_killed_install_is_removed(tmp_path: Path) -> None:
    scratch = tiny_dir(tmp_path).parent / f".{TINY_NAME}-killed"  # what a SIGKILLed install leaves behind
    scratch.mkdir(parents=True)
    (scratch / "tokenizer.json").write_text("{}")
    ensure_tiny(tmp_path)
    assert {path.name for path in tiny_dir(tmp_path).parent.iterdir()} == {TINY_NAME, f"{TINY_NAME}.lock"}


def test_other_weights_in_the_cache_are_replaced(reduced_build: Path, tmp_path: Path) -> None:
    replaced = ensure_tiny(cached_copy(reduced_build, tmp_path))
    assert read_manifest(replaced)["weights_sha256"] == shipped_facts()["weights_sha256"]


def test_a_damaged_cache_says_what_to_do(tmp_path: Path) -> None:
    (ensure_tiny(tmp_path) / "config.json").write_text("{}")
    with pytest.raises(ModelResolutionError, match="delete that directory"):
        ensure_tiny(tmp_path)


def test_cli_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        tinymodel.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_builtin_tiny_has_a_mediocre_task_and_a_strong_probe(builtin_tiny_dir: Path) -> None:
    model, tokenizer = load_model(builtin_tiny_dir)
    assert sum(param.numel() for param in model.parameters()) < 200_000
    task_accuracy = greedy_accuracy(model, tokenizer, addition_task().held_out())
    probe_accuracy = greedy_accuracy(model, tokenizer, reversal_task().held_out())
    assert 0.30 <= task_accuracy <= 0.50
    assert probe_accuracy >= 0.95
    # Measured where the weights were built; another CPU's float arithmetic may flip a greedy token or two.
    recorded = read_manifest(builtin_tiny_dir)["held_out_accuracy"]
    assert recorded == pytest.approx({"task": task_accuracy, "probe": probe_accuracy}, abs=0.01)
    assert (builtin_tiny_dir / MANIFEST).is_file()
