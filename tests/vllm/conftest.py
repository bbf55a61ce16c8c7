"""Fixtures of the vLLM tests: a model vLLM's CPU attention accepts (head size 64), built locally in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swarmtune.modelbuild import build_random_model

# Two heads of 64 (the CPU kernels refuse builtin:tiny's 16); untied, so lm_head is a low-rank matrix too.
HEAD64_SHAPE = {"hidden": 128, "layers": 2, "heads": 2, "intermediate": 256}


@pytest.fixture(scope="session")
def vllm_module() -> Any:
    """vLLM itself: a vllm-marked test fails (never skips) where it is missing."""
    import vllm

    return vllm


@pytest.fixture(scope="session")
def head64_dir(tmp_path_factory: pytest.TempPathFactory, vllm_module: Any) -> Path:
    """The head-size-64 random Llama (character tokenizer, fp32 safetensors) on disk."""
    return build_random_model(tmp_path_factory.mktemp("head64-model"), **HEAD64_SHAPE)
