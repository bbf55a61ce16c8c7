"""The coordinator writes genesis from the model's files without loading the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtune import identity, models
from swarmtune.coordinator.server import genesis_from_model
from swarmtune.jobspec import parse_job_spec
from swarmtune.state import build_plan, master_from_model, state_hash
from tests.support.specs import job_spec


@pytest.mark.parametrize("family", ["dense", "lowrank"])
def test_genesis_hash_and_plan_without_loading_the_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    model, _ = models.load_model(tiny_model_dir)
    reference = master_from_model(model, build_plan(model, family))
    spec = parse_job_spec(
        job_spec("streamed-genesis", model=tiny_model_dir, task={"name": "countdown"}, seed=1, noise={"family": family}).encode()
    )

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("the coordinator loaded the model to write genesis")

    monkeypatch.setattr(models, "load_model", no_loading)
    genesis = genesis_from_model(spec, identity.generate_key(), ())
    assert genesis.base_state_hash == state_hash(reference)
    assert genesis.tensor_plan == reference.specs
