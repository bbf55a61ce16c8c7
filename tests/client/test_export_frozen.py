"""Export of a low-rank job whose frozen tensors (the tied embedding) are spilled: the weights a resident state gives."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from swarmtune import entries, identity
from swarmtune.client.export import export_model
from swarmtune.coordinator.server import genesis_from_model
from swarmtune.fixedpoint import derive
from swarmtune.jobspec import parse_job_spec
from swarmtune.modelbuild import build_random_model
from swarmtune.models import load_model
from swarmtune.replay import base_state
from swarmtune.state import parameter_aliases
from tests.support.tiny_models import SMALL_SHAPE


def test_frozen_tensors_are_exported_from_their_spill(tmp_path: Path) -> None:
    model_dir = build_random_model(tmp_path / "base", dtype="bfloat16", tie_word_embeddings=True, **SMALL_SHAPE)
    spec = parse_job_spec(
        f'[job]\nid = "export-frozen"\nmodel = "{model_dir}"\n[task]\nname = "countdown"\n[noise]\nfamily = "lowrank"\n'.encode()
    )
    key = identity.generate_key()
    ledger = [entries.parse_entry(entries.seal(key, entries.first_entry(spec.job_id, genesis_from_model(spec, key, ()), 1)))]
    exported = export_model(model_dir, ledger, tmp_path / "out")
    model, _ = load_model(model_dir)
    state = base_state(model, ledger[0].entry.body)  # type: ignore[arg-type]
    assert exported.state_hash == ledger[0].entry.body.base_state_hash  # type: ignore[union-attr]
    spilled = [index for index, q in enumerate(state.q) if q.is_meta]
    assert "lm_head.weight" in {state.specs[index].name for index in spilled}
    aliases = parameter_aliases(model)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as saved:
        for index, spec in enumerate(state.specs):
            expected = derive(state.whole(index).clone(), spec.exponent, torch.bfloat16)
            names = [name for name in aliases[spec.name] if name in saved.keys()]  # a tie is saved once
            assert len(names) == 1, (spec.name, names)
            for name in names:
                assert torch.equal(saved.get_tensor(name), expected), name
                assert torch.equal(saved.get_tensor(name), model.get_parameter(name).detach()), name  # bf16 base: exact
