"""Model resolution and loading: local directories, hub ids and `builtin:tiny`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from swarmtune.modelpaths import ModelResolutionError, cache_root

BUILTIN_PREFIX = "builtin:"
# Hugging Face hub ids: "name" or "owner/name" built from word characters, dots and dashes.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Where transformers 5's tokenizer classes (Qwen2, Llama, GPT-2 style) keep the Python vocabulary and
# merges they built their Rust tokenizer from: read again only by save_vocabulary.
TOKENIZER_BUILD_SOURCES = ("_vocab", "_merges")


def resolve_model(spec: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local directory for a model spec: `builtin:tiny`, a local directory, or a hub id."""
    if spec.startswith(BUILTIN_PREFIX):
        return resolve_builtin(spec[len(BUILTIN_PREFIX):], cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return checked_model_dir(path)
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return download_from_hub(spec, cache_dir)
    raise ModelResolutionError(
        f"model {spec!r}: no such directory; pass a model directory, a hub id, or builtin:tiny"
    )


def resolve_builtin(name: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cached directory of a built-in model, installed on first use."""
    if name != "tiny":
        raise ModelResolutionError(f"unknown built-in model 'builtin:{name}'; the built-in model is builtin:tiny")
    from swarmtune.tinymodel import ensure_tiny

    return ensure_tiny(cache_root(cache_dir))


def checked_model_dir(path: Path) -> Path:
    """path itself, once it looks like a Hugging Face model directory."""
    if not path.is_dir():
        raise ModelResolutionError(f"model {str(path)!r} is a file; pass the model's directory")
    if not (path / "config.json").is_file():
        raise ModelResolutionError(
            f"model directory {str(path)!r} has no config.json; pass a directory written by save_pretrained"
        )
    return path


def download_from_hub(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Download (or find in the HF cache) a hub snapshot; failures say how to proceed offline."""
    from huggingface_hub import snapshot_download

    hub_cache = cache_root(cache_dir) / "hub" if cache_dir is not None else None
    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache))
    except Exception as exc:  # network, auth and missing-repo errors all end the same way
        raise ModelResolutionError(
            f"could not fetch hub model {repo_id!r} ({type(exc).__name__}: {exc}). "
            "Without access to the Hugging Face Hub, download the model elsewhere and pass its local "
            "directory, or use builtin:tiny"
        ) from exc


def load_model(path: str | os.PathLike[str], device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a model directory: eval mode, no gradients, left padding.

    dtype: a torch dtype or its name; None keeps the checkpoint's dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = checked_model_dir(Path(path).expanduser())
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto" if dtype is None else dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), padding_side="left")
    if tokenizer.pad_token is None:
        # Models without a pad token (most base LLMs) pad with eos; left padding keeps it out of the way.
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def drop_tokenizer_sources(tokenizer: Any) -> None:
    """Release the Python copies of the vocabulary and merges a Rust-backed tokenizer was built from
    (encoding and decoding use the Rust tokenizer only; saving it needs them: a worker never saves).
    A 152k-token vocabulary is 17 MB of Python objects, a real BPE tokenizer's merges more."""
    if getattr(tokenizer, "_tokenizer", None) is None:
        return  # a pure-Python tokenizer encodes with them
    for name in TOKENIZER_BUILD_SOURCES:
        if getattr(tokenizer, name, None) is not None:
            setattr(tokenizer, name, None)
