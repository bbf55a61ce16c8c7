"""Invariant 1: replay gives the same bytes under every CPU capability and thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.tiny_models import tiny_llama

CAPABILITIES = ["default", "avx2"]
THREADS = [1, 2]


def run_probe(model_dir: Path, capability: str, threads: int) -> dict[str, dict[str, str]]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.replay_probe", str(model_dir), str(threads)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_replay_hash_is_identical_across_capabilities_and_threads(tmp_path: Path) -> None:
    tiny_llama(hidden=64, tie=False).save_pretrained(tmp_path)
    runs = [run_probe(tmp_path, cap, threads) for cap in CAPABILITIES for threads in THREADS]
    for family in ("dense", "lowrank"):
        results = [run[family] for run in runs]
        assert {r["capability"].lower() for r in results} == {"default", "avx2"}  # the override took effect
        assert len({r["state"] for r in results}) == 1, results
        assert len({r["derived"] for r in results}) == 1, results
    assert runs[0]["dense"]["state"] != runs[0]["lowrank"]["state"]


def test_hash_command_prints_the_same_hash_under_both_capabilities(tmp_path: Path) -> None:
    from swarmtune import state

    model = tiny_llama(hidden=64, tie=False)
    model.save_pretrained(tmp_path)
    expected = state.state_hash(state.master_from_model(model, state.build_plan(model, "dense"))).hex()
    printed = set()
    for capability in CAPABILITIES:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run(
            [sys.executable, "-m", "swarmtune", "hash", "--model", str(tmp_path)],
            env=env, capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        printed.add(out.stdout.strip())
    assert printed == {expected}
