"""Tiny Llama models for tests: in memory, or saved with the character tokenizer (session fixtures).

The fixtures are registered for every test by `pytest_plugins` in tests/conftest.py; each model is
built once per session, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarmtune.modelbuild import build_random_model
from swarmtune.models import resolve_model


class ModelShape(TypedDict):
    """build_random_model's size arguments."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


# One layer, two heads: the model every multi-process test runs (fast to evaluate on a shared CPU).
SMALL_SHAPE = ModelShape(hidden=32, layers=1, heads=2, intermediate=64)


def tiny_llama(seed: int = 0, tie: bool = True, hidden: int = 32) -> LlamaForCausalLM:
    """An in-memory Llama with grouped-query attention (4 query, 2 key/value heads), no tokenizer or files."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Llama (2 layers) with the character tokenizer, for the real from_pretrained path."""
    return build_random_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SMALL_SHAPE random Llama (character tokenizer) that clusters of real processes train."""
    return build_random_model(tmp_path_factory.mktemp("small-model"), **SMALL_SHAPE)


@pytest.fixture(scope="session")
def builtin_tiny_dir() -> Path:
    """builtin:tiny from the swarmtune cache (installed there from the shipped weights on first use)."""
    return resolve_model("builtin:tiny")
