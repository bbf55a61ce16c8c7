"""Tasks by name: the built-ins, or `module:attribute` naming a ready Task or a TRL reward function."""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Mapping

from swarmtune.tasks import conciseness, countdown, demo, math_answer
from swarmtune.tasks.base import (
    DatasetTask,
    Example,
    RewardFn,
    Task,
    TaskLoadError,
    read_records,
    render_prompt,
    split_held_out,
)

TaskFactory = Callable[..., Task]

# Built-in task names -> factories taking keyword options (all accept `tokenizer`).
BUILTIN_TASKS: Mapping[str, TaskFactory] = MappingProxyType(
    {
        "demo": demo.addition_task,
        "demo-add": demo.addition_task,
        "demo-reverse": demo.reversal_task,
        "countdown": countdown.load,
        "conciseness": conciseness.load,
        "math": math_answer.load,
    }
)


def load_task(name_or_ref: str, **options: Any) -> Task:
    """The task a job names: a built-in name or a `module:attribute` reference.

    - a built-in name (`countdown`, `conciseness`, `math`): its factory with `options`;
    - `module:attr` or `path/to/file.py:attr` where attr is a Task instance: that Task (the only
      option it takes is `tokenizer`, ignored: it formatted its prompts itself);
    - `module:attr` where attr is a TRL reward function `(prompts, completions, **columns) ->
      list[float]`: a task over `data` (JSON/JSONL rows with a `prompt` column and any other
      columns); options `data` (required), `held_out_data` (else a `held_out_fraction` of `data`,
      default 0.1), `reward_range` (default unbounded), `tokenizer`, `name` (default the ref).

    Custom reward functions are called as TRL's GRPOTrainer calls them: `prompts` are the dataset's
    own prompts (strings, or message lists for conversational rows), `completions` are strings (or
    `[{"role": "assistant", "content": ...}]` for conversational rows), and every other column is a
    keyword argument of parallel lists. String prompts are used verbatim; message-list prompts go
    through the tokenizer's chat template (plain `Role: content` lines without one).
    """
    if name_or_ref in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_ref](**options)
    if ":" not in name_or_ref:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskLoadError(f"unknown task {name_or_ref!r}: use one of {known}, or module:function")
    target = resolve(name_or_ref)
    if isinstance(target, Task):
        extra = sorted(set(options) - {"tokenizer"})
        if extra:
            raise TaskLoadError(f"{name_or_ref} is a ready Task and takes no options, got {', '.join(extra)}")
        return target
    if not callable(target):
        raise TaskLoadError(f"{name_or_ref} is neither a Task nor a reward function")
    return reward_task(name_or_ref, target, **options)


def resolve(ref: str) -> Any:
    """The attribute a `module:attr` or `path/to/file.py:attr` reference names."""
    module_name, _, attr = ref.rpartition(":")
    if not module_name or not attr:
        raise TaskLoadError(f"{ref!r}: expected module:attribute, e.g. my_rewards:accuracy")
    module = _import_file(Path(module_name)) if module_name.endswith(".py") else _import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TaskLoadError(f"module {module_name!r} has no attribute {attr!r}") from None


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise TaskLoadError(
            f"cannot import {name!r} ({exc}); put it on PYTHONPATH, or give its file: path/to/{name}.py:function"
        ) from None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TaskLoadError(f"reward module file not found: {path}")
    # A name unique to the resolved path, registered so dataclasses and pickling can find the module.
    name = "swarmtune_task_" + "_".join(path.resolve().with_suffix("").parts[1:])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskLoadError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class TrlReward:
    """Adapts a TRL reward function to `Task.reward`: original prompts, checked float results."""

    ref: str
    fn: RewardFn

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        originals = columns.pop("prompt", prompts)
        if originals and not isinstance(originals[0], str):
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        rewards = self.fn(prompts=originals, completions=completions, **columns)
        if not isinstance(rewards, (list, tuple)) or len(rewards) != len(completions):
            raise ValueError(f"reward function {self.ref} must return one float per completion")
        # numbers.Real also admits numpy scalars, which TRL reward functions often return.
        if not all(isinstance(r, numbers.Real) and math.isfinite(r) for r in rewards):
            raise ValueError(f"reward function {self.ref} returned a missing or non-finite reward: {rewards}")
        return [float(r) for r in rewards]


def reward_task(
    ref: str,
    fn: RewardFn,
    *,
    data: str | Path | None = None,
    held_out_data: str | Path | None = None,
    held_out_fraction: float = 0.1,
    reward_range: tuple[float, float] = (-math.inf, math.inf),
    tokenizer: Any = None,
    name: str | None = None,
) -> DatasetTask:
    """A task pairing a TRL reward function with a JSON/JSONL dataset that has a `prompt` column."""
    if data is None:
        raise TaskLoadError(f"{ref} is a reward function: give data=PATH.jsonl with a 'prompt' column")
    examples = prompt_examples(data, tokenizer)
    if held_out_data is None:
        train, held_out = split_held_out(examples, held_out_fraction)
    else:
        train, held_out = tuple(examples), tuple(prompt_examples(held_out_data, tokenizer))
    return DatasetTask(name or ref, tuple(reward_range), train, held_out, TrlReward(ref, fn))


def prompt_examples(path: str | Path, tokenizer: Any = None) -> list[Example]:
    """Examples of TRL-format rows; every column, `prompt` included, is kept for the reward."""
    examples = []
    for n, row in enumerate(read_records(path), 1):
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            examples.append(Example(prompt, row))
        elif _is_chat(prompt):
            examples.append(Example(render_prompt(prompt, tokenizer), row))
        else:
            raise TaskLoadError(f"{path}: row {n} needs a 'prompt' string or list of role/content messages")
    return examples


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value)
