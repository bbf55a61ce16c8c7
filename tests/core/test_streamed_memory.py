"""Peak memory of hash, replay, audit --replay, export and genesis on a ~50M-parameter bf16 tied model, each
in its own process: within 6 bytes a parameter over the process's fixed cost (issue 15: <= 7 in all)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarmtune import ledgerfile
from swarmtune.modelbuild import build_random_model
from swarmtune.models import load_model
from tests.support.replay_ledger import build_ledger

# 12 layers of hidden 512 / intermediate 2048: 50M parameters, enough for per-parameter costs to dominate.
SHAPE = {"hidden": 512, "layers": 12, "heads": 8, "intermediate": 2048}
STATE_BYTES_PER_PARAM = 6
COORDINATOR_PEAK_BYTES = 512 * 2**20
# Run in the child: everything the commands import is imported first, so the fixed cost counts it.
CHILD = """
import json, sys
def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import tqdm
import transformers.models.llama.modeling_llama
from swarmtune import cli, statefiles
from swarmtune.client import audit, export
from swarmtune.coordinator import server
cli.build_parser()
# One chunk through the streaming path first: torch's thread pool and allocator arenas are a per-process
# cost (it grows with the machine's core count, not the model), so it belongs to the fixed cost.
import torch
from swarmtune.fixedpoint import to_fixed
from swarmtune.state import CHUNK_ELEMENTS
to_fixed(torch.ones(CHUNK_ELEMENTS, dtype=torch.bfloat16), 0).numpy().tobytes()
fixed = high_water()
if sys.argv[1] == "genesis":
    from pathlib import Path
    statefiles.genesis_base_state(Path(sys.argv[2]), "lowrank", "dense")
    code = 0
else:
    code = cli.main(sys.argv[1:])
print(json.dumps({"fixed": fixed, "peak": high_water(), "code": code}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """The model directory, its ledger file (genesis and a low-rank iteration with anchored decay: the base
    spilled to disk) and its parameter count."""
    directory = build_random_model(tmp_path_factory.mktemp("big-model"), dtype="bfloat16", tie_word_embeddings=True, **SHAPE)
    model, _ = load_model(directory)
    path = directory.parent / "ledger.bin"
    ledgerfile.write(path, build_ledger(model, iterations=1))
    return directory, path, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def replayed_hash(big_model: tuple[Path, Path, int]) -> dict[str, str]:
    """The state hash each command reports (filled by the tests: all must agree)."""
    return {}


def measured(*argv: str) -> dict[str, int]:
    """Fixed cost and peak RSS of a child process running one command; its output's last line."""
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "output": lines[:-1]}


@pytest.mark.parametrize("command", ["hash", "replay", "audit", "export"])
def test_bytes_per_parameter(big_model: tuple[Path, Path, int], replayed_hash: dict[str, str], tmp_path: Path, command: str) -> None:
    directory, ledger_path, params = big_model
    argv = {
        "hash": ["hash", "--model", str(directory)],
        "replay": ["replay", "--ledger", str(ledger_path), "--model", str(directory), "--json"],
        "audit": ["audit", "--ledger", str(ledger_path), "--replay", "--model", str(directory), "--json"],
        "export": ["export", "--ledger", str(ledger_path), "--model", str(directory), "--out", str(tmp_path / "out"), "--json"],
    }[command]
    result = measured(*argv)
    assert result["code"] == 0, result
    if command != "hash":
        replayed_hash[command] = json.loads(result["output"][-1])["final_state_hash" if command == "audit" else "state_hash"]
        assert len(set(replayed_hash.values())) == 1, replayed_hash
    per_param = (result["peak"] - result["fixed"]) / params
    print(f"{command}: fixed {result['fixed'] / 2**20:.0f} MiB, peak {result['peak'] / 2**20:.0f} MiB, {per_param:.2f} B/param over fixed")
    assert per_param <= STATE_BYTES_PER_PARAM, f"{command}: {per_param:.2f} bytes/param over the fixed cost"


def test_coordinator_genesis_stays_under_half_a_gigabyte(big_model: tuple[Path, Path, int]) -> None:
    directory = big_model[0]
    result = measured("genesis", str(directory))
    print(f"genesis: fixed {result['fixed'] / 2**20:.0f} MiB, peak {result['peak'] / 2**20:.0f} MiB")
    assert result["peak"] <= COORDINATOR_PEAK_BYTES
    # Streamed: nothing grows with the model (its bf16 weights alone would be 96 MiB).
    assert result["peak"] - result["fixed"] <= 32 * 2**20
