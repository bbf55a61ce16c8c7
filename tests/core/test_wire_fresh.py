"""The committed generated wire code is exactly what proto/generate.sh produces from proto/*.proto."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WIRE = ROOT / "swarmtune" / "wire"


def _generated(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.py"))}


def test_generated_wire_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the wire code (pip install grpcio-tools)")
    out = tmp_path / "wire"
    subprocess.run(
        ["bash", str(ROOT / "proto" / "generate.sh"), str(out)],
        check=True, capture_output=True, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    fresh, committed = _generated(out), _generated(WIRE)
    assert sorted(fresh) == sorted(committed), "run proto/generate.sh: the set of generated files changed"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run proto/generate.sh: {stale} do not match proto/*.proto"


def test_generated_imports_are_package_relative() -> None:
    for path in WIRE.glob("*_pb2*.py"):
        top_level = re.search(r"^import \w+_pb2", path.read_text(), re.MULTILINE)
        assert not top_level, f"{path.name}: run proto/generate.sh"
