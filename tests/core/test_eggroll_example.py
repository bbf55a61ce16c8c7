"""examples/eggroll.toml is EGGROLL's regime on the demo model, and `swarmtune demo --job` runs job files."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtune.jobspec import load_job_spec
from tests.support.cli_runner import run_cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_eggroll_example_is_a_large_rank_1_group_shaped_population() -> None:
    spec = load_job_spec(EXAMPLES / "eggroll.toml")
    assert spec.population >= 1024 and spec.noise_family == "lowrank" and spec.rank == 1
    assert 2 <= spec.group_width < spec.population and spec.member_prompt_count < spec.prompts_per_iteration
    assert spec.model == "builtin:tiny" and spec.retention_task == "demo-reverse"  # what the demo measures


def test_demo_refuses_a_job_file_without_a_probe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[job]\nid = "x"\nmodel = "builtin:tiny"\n[task]\nname = "demo"\n')
    assert run_cli(monkeypatch, "demo", "--job", str(job), "--workdir", str(tmp_path / "run")) == 2
    assert "has no [retention] task; the demo measures its probe" in capsys.readouterr().err
    job.write_text('[job]\nid = "x"\nmodel = "builtin:tiny"\n[task]\nname = "demo"\n[es]\npopulation = 8\ngroup_size = 3\n')
    assert run_cli(monkeypatch, "demo", "--job", str(job)) == 2
    assert "group_size (3) must divide [es] population (8)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
