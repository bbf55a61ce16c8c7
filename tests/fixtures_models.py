"""Session fixtures for tests that need real model directories (enable with `pytest_plugins`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtune.modelbuild import build_random_model
from swarmtune.models import resolve_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Llama with the character tokenizer, for the real from_pretrained path."""
    return build_random_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def builtin_tiny_dir() -> Path:
    """builtin:tiny from the swarmtune cache (installed there from the shipped weights on first use)."""
    return resolve_model("builtin:tiny")
