"""The task interface: examples, held-out splits, per-iteration sampling, prompts and TRL-style rewards."""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

# TRL's GRPOTrainer reward signature: (prompts, completions, **columns) -> list[float].
# Columns are the dataset fields of each example, passed as parallel lists.
RewardFn = Callable[..., list[float]]

# A chat in the shape tokenizers' chat templates take: [{"role": ..., "content": ...}, ...].
Messages = Sequence[Mapping[str, str]]


class TaskLoadError(ValueError):
    """A task, its module or its data cannot be loaded; the message says what to fix."""


@dataclass(frozen=True)
class Example:
    """One dataset row: the formatted prompt and the columns its reward needs."""

    prompt: str
    columns: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """What the coordinator, workers and the demo need from a task."""

    name: str
    reward_range: tuple[float, float]  # results outside it are rejected by the coordinator

    def train(self) -> Sequence[Example]: ...

    def held_out(self) -> Sequence[Example]: ...

    def reward(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]: ...


@dataclass(frozen=True)
class DatasetTask:
    """A Task over fixed train and held-out examples with one TRL-style reward function."""

    name: str
    reward_range: tuple[float, float]
    train_examples: tuple[Example, ...]
    held_out_examples: tuple[Example, ...]
    reward_fn: RewardFn

    def train(self) -> Sequence[Example]:
        return self.train_examples

    def held_out(self) -> Sequence[Example]:
        return self.held_out_examples

    def reward(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return [float(value) for value in self.reward_fn(prompts, completions, **columns)]


def dataset_task(
    name: str,
    reward_range: tuple[float, float],
    examples: Sequence[Example],
    reward_fn: RewardFn,
    held_out_fraction: float = 0.1,
) -> DatasetTask:
    """A DatasetTask whose held-out set is the deterministic `split_held_out` of `examples`."""
    train, held_out = split_held_out(examples, held_out_fraction)
    return DatasetTask(name, reward_range, train, held_out, reward_fn)


def example_digest(example: Example) -> bytes:
    """A hash of what identifies an example: its columns, or its prompt when it has none.

    The prompt is otherwise left out because it depends on the tokenizer's chat template, and every
    site must derive the same split whatever tokenizer it formats prompts with.
    """
    identity = example.columns or example.prompt
    canonical = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(b"swarmtune/held-out/v1/" + canonical.encode()).digest()


def split_held_out(
    examples: Sequence[Example], fraction: float
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, held_out): the ceil(fraction·n) examples of smallest `example_digest` are held out.

    Hashing rather than taking the last rows keeps sorted datasets (e.g. by difficulty) unbiased,
    and identical rows always land on the same side, so duplicates cannot leak across the split.
    Both parts keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise TaskLoadError(f"held_out_fraction must be in [0, 1), got {fraction}")
    digests = [example_digest(ex) for ex in examples]
    count = math.ceil(fraction * len(examples))
    chosen = set(sorted(range(len(examples)), key=lambda i: (digests[i], i))[:count])
    # Extend the cut to every copy of a held-out row so no duplicate stays in train.
    held_digests = {digests[i] for i in chosen}
    held = tuple(ex for ex, d in zip(examples, digests) if d in held_digests)
    train = tuple(ex for ex, d in zip(examples, digests) if d not in held_digests)
    return train, held


def sample_indices(job_seed: int, iteration: int, size: int, k: int, salt: str = "train", group: int = 0) -> list[int]:
    """Indices of group g's prompt batch of iteration t: the same on every site, from (job seed, t, g).

    Group 0 draws from (job seed, t) alone, so a job with one group keeps the draw it always had.
    """
    suffix = f"/{group}" if group else ""
    digest = hashlib.sha256(f"swarmtune/prompts/v1/{salt}/{job_seed}/{iteration}{suffix}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    if k >= size:
        return list(range(size))
    return sorted(rng.sample(range(size), k))


def columns_of(examples: Sequence[Example]) -> dict[str, list[Any]]:
    """Example columns as parallel lists, the shape TRL reward functions take."""
    keys = sorted({key for ex in examples for key in ex.columns})
    return {key: [ex.columns.get(key) for ex in examples] for key in keys}


def render_prompt(messages: Messages, tokenizer: Any = None, assistant_prefix: str = "") -> str:
    """The prompt text of a chat, ending where the model's completion starts.

    With a tokenizer that has a chat template: the template with the generation prompt, then the
    assistant prefix. Otherwise plain text: system content, then `User: ...` lines, then
    `Assistant:` and the prefix (the layout of TinyZero's base-model Countdown template).
    """
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text + assistant_prefix
    lines = [m["content"] if m["role"] == "system" else f"{m['role'].title()}: {m['content']}" for m in messages]
    opening = f"Assistant: {assistant_prefix}" if assistant_prefix else "Assistant:"
    return "\n".join([*lines, opening])


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` (possibly None) can format chats with its own template."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat(user: str, system: str = "") -> list[dict[str, str]]:
    """A one-turn chat, with a system message only when `system` is non-empty."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON array file or a JSONL file (blank lines skipped), as dicts."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskLoadError(f"dataset file not found: {source}") from None
    except OSError as exc:
        raise TaskLoadError(f"cannot read dataset file {source}: {exc}") from None
    if text.lstrip().startswith("["):
        rows = _parse_json(text, f"{source}")
        if not isinstance(rows, list):
            raise TaskLoadError(f"{source}: expected a JSON array of objects")
    else:
        lines = enumerate(text.splitlines(), 1)
        rows = [_parse_json(line, f"{source}:{n}") for n, line in lines if line.strip()]
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise TaskLoadError(f"{source}: row {n} is not a JSON object")
    return rows


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskLoadError(f"{where}: invalid JSON ({exc.msg})") from None
