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


def build_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 0) -> Any:
    """Build the character-level tokenizer, save it to out_dir and return it (left padding).

    vocab_size > the character count pads the vocabulary with `<fill_N>` tokens no text encodes to,
    so a model with a real model's embedding size decodes every id it can emit.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    base = SPECIAL_TOKENS + tuple(CHARACTERS)
    fillers = tuple(f"<fill_{index}>" for index in range(len(base), vocab_size))
    vocab = {token: index for index, token in enumerate(base + fillers)}
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
        **_decoder_fields(tokenizer, len(tokenizer), hidden, layers, heads, heads, intermediate),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
    )


def _decoder_fields(
    tokenizer: Any, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int
) -> dict[str, int | None]:
    """The configuration fields every decoder-only HF config names alike: sizes and special tokens."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


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


# Qwen2.5-0.5B's shape (494,032,768 parameters with q/k/v biases, tied embeddings, bf16).
QWEN05B_SHAPE = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151936}


def build_qwen2_model(
    out_dir: str | os.PathLike[str],
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    seed: int = 0,
) -> Path:
    """Save a random Qwen2-architecture model (bf16, tied, q/k/v biases) plus the character tokenizer
    padded to `vocab`; QWEN05B_SHAPE gives Qwen2.5-0.5B's shape. Same arguments, same bytes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=vocab)
    config = Qwen2Config(
        **_decoder_fields(tokenizer, vocab, hidden, layers, heads, kv_heads, intermediate),
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    # bf16, as Qwen2.5 ships: each portable init value is rounded to bf16 once, when it is written.
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    initialise_weights(model, seed)
    model.save_pretrained(str(out))
    return out
