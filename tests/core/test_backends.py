"""The backends' room: each found by name in the registry, the HF backend importable on its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from swarmtune.backends import hf
from swarmtune.backends.base import BackendError
from swarmtune.backends.registry import backend_factory


def test_backends_by_name() -> None:
    assert backend_factory("hf") is hf.build
    for name in ("onnx", "tensorrt"):
        with pytest.raises(BackendError, match=rf"^unknown backend '{name}': use one of hf, vllm$"):
            backend_factory(name)


def test_the_hf_backend_imports_alone_without_any_role() -> None:
    roles = ("swarmtune.coordinator", "swarmtune.worker", "swarmtune.client", "swarmtune.cli", "swarmtune.demo")
    check = f"import sys, swarmtune.backends.hf; print(sorted(m for m in sys.modules if m.startswith({roles!r})))"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "[]\n"  # no role module came with it
