"""Export writes the derived weights in the base model's own dtype, with tokenizer and provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from swarmtune import entries, identity
from swarmtune.client.export import PROVENANCE_FILE, ExportError, export_model
from swarmtune.coordinator.server import genesis_from_model
from swarmtune.fixedpoint import derive
from swarmtune.jobspec import parse_job_spec
from swarmtune.modelbuild import build_random_model
from swarmtune.models import load_model
from swarmtune.replay import base_state
from tests.support.tiny_models import SMALL_SHAPE


def genesis_only(model_dir: Path) -> list[entries.StoredEntry]:
    spec = parse_job_spec(f'[job]\nid = "export-unit"\nmodel = "{model_dir}"\n[task]\nname = "countdown"\n'.encode())
    key = identity.generate_key()
    stored = entries.seal(key, entries.first_entry(spec.job_id, genesis_from_model(spec, key, ()), 1))
    return [entries.parse_entry(stored)]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("bf16"), dtype="bfloat16", **SMALL_SHAPE)


def test_bfloat16_weights_are_the_derived_ones_in_bfloat16(bf16_model: Path, tmp_path: Path) -> None:
    ledger = genesis_only(bf16_model)
    exported = export_model(bf16_model, ledger, tmp_path / "out")
    assert (exported.iteration, exported.dtype) == (0, "bfloat16")
    assert exported.state_hash == ledger[0].entry.body.base_state_hash  # type: ignore[union-attr]
    model, _ = load_model(bf16_model)
    state = base_state(model, ledger[0].entry.body)  # type: ignore[arg-type]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as saved:
        for spec, q in zip(state.specs, state.q):
            tensor = saved.get_tensor(spec.name)
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, derive(q, spec.exponent, torch.bfloat16).view(spec.shape)), spec.name
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert provenance == exported.provenance() and provenance["entry_hash"] == ledger[0].hash.hex()


def test_export_refuses_iterations_the_ledger_does_not_hold(bf16_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="holds iterations 0 to 0"):
        export_model(bf16_model, genesis_only(bf16_model), tmp_path / "out", iteration=1)
    assert not (tmp_path / "out").exists()
