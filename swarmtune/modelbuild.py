"""Local model builders: the constructed character tokenizer, small Llama configs, portable random init."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

# Every character the built-in tasks, the tiny model and simple test prompts use. The order is
# part of the tokenizer's identity: changing it changes every token id (and every model hash).
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = (
    "0123456789"
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "+-*/=()<> ,.?:!;'\"_[]\n"
)
# Role-prefixed turns, so a task that formats prompts through the chat template works on tiny models.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Uniform 16-bit integer init in [-2^15, 2^15) scaled by 2^-20: std ~0.018 (HF's default is 0.02),
# and every value is an exact float, so the weights do not depend on the CPU's random-number paths.
_INIT_EXPONENT = -20


def build_tokenizer(out_dir: str | os.PathLike[str]) -> Any:
    """Build the character-level tokenizer, save it to out_dir and return it (left padding)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    # BPE without merges splits text into single characters; unknown characters become <unk>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # join characters back without separators
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_llama_config(
    tokenizer: Any, *, hidden: int, layers: int, heads: int, intermediate: int, tie_word_embeddings: bool
) -> Any:
    """A small Llama configuration over the character tokenizer (no biases: every layer a plain Linear)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def portable_uniform_init(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """Deterministic init values for one tensor, from SHAKE-256 of (seed, tensor name): the same
    bytes on every machine and library version."""
    import torch

    count = int(np.prod(shape))
    stream = hashlib.shake_256(f"swarmtune/random-model/v1/{seed}/{name}".encode()).digest(2 * count)
    integers = np.frombuffer(stream, dtype="<i2").astype(np.float32)
    values = np.ldexp(integers, _INIT_EXPONENT).reshape(shape)
    return torch.from_numpy(values)


def initialise_weights(model: Any, seed: int) -> None:
    """Overwrite every weight from the portable generator; norm weights start at one, as in HF."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(portable_uniform_init(name, tuple(param.shape), seed))


def build_random_model(
    out_dir: str | os.PathLike[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    seed: int = 0,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
) -> Path:
    """Save a randomly initialised tiny Llama (safetensors) plus the character tokenizer to out_dir.

    The same arguments give byte-identical files on any machine.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = tiny_llama_config(
        tokenizer,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config)
    initialise_weights(model, seed)
    model.to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    return out
