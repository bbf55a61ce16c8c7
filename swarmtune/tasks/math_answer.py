"""GSM8K-style math: the completion's final number against the reference, and a JSONL loader.

Final number of a text (completion or reference alike):
    1. after the last `####`, up to the end of that line: the first number there; else
    2. inside the last `\\boxed{...}` (braces balanced; `\\frac{a}{b}` read as a/b): its first number; else
    3. the last number anywhere in the text.
A number is an optional sign, digits (optionally grouped `1,234`), an optional decimal part, and
optionally `/` and a second such number (a fraction); its value is an exact `Fraction`.

    reward = 1.0 if the completion has a final number and it equals the reference's exactly, else 0.0

so `1,000`, `1000`, `1000.00` and `\\boxed{1000}` all match `#### 1000`, and `0.5` matches `1/2`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from swarmtune.tasks.base import DatasetTask, Example, TaskLoadError, chat, dataset_task, read_records, render_prompt

# verl's GSM8K preprocessing instruction, so prompts match common RL baselines.
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
REWARD_RANGE = (0.0, 1.0)

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(rf"(?<![\w.])[-+]?{_UNSIGNED}(?:\s*/\s*{_UNSIGNED})?")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_MARKER = "####"
_BOXED = "\\boxed{"


def parse_number(text: str) -> Fraction | None:
    """The exact value of one number match such as `-1,234.5` or `3/4`; None for a zero denominator."""
    parts = [Fraction(part.replace(",", "").strip()) for part in text.split("/")]
    if len(parts) == 2 and parts[1] == 0:
        return None
    return parts[0] / parts[1] if len(parts) == 2 else parts[0]


def final_number(text: str) -> Fraction | None:
    """The final answer of a text by the rules in the module docstring, or None when it has none."""
    if _MARKER in text:
        return _first_number(text.rsplit(_MARKER, 1)[1].split("\n", 1)[0])
    boxed = _last_boxed(text)
    if boxed is not None:
        return _first_number(_FRAC.sub(r"\1/\2", boxed))
    matches = _NUMBER.findall(text)
    return parse_number(matches[-1]) if matches else None


def _first_number(text: str) -> Fraction | None:
    match = _NUMBER.search(text)
    return parse_number(match.group()) if match else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for pos in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[begin:pos]
    return None


def math_reward(prompts: list[Any], completions: list[str], *, answer: list[str], **_: Any) -> list[float]:
    """TRL-style batch reward: 1.0 where the final numbers of completion and reference agree."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        got, want = final_number(completion), final_number(str(reference))
        rewards.append(1.0 if got is not None and got == want else 0.0)
    return rewards


def prompt_text(question: str, tokenizer: Any = None) -> str:
    """The question and the `####` instruction, through the chat template when there is one."""
    return render_prompt(chat(f"{question} {INSTRUCTION}"), tokenizer)


def load_examples(path: str | Path, tokenizer: Any = None) -> list[Example]:
    """Examples from GSM8K-style JSONL rows: `question`, and `answer` ending in `#### N`."""
    examples = []
    for n, row in enumerate(read_records(path), 1):
        question, reference = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(reference, str):
            raise TaskLoadError(f"{path}: row {n} needs string fields 'question' and 'answer'")
        if final_number(reference) is None:
            raise TaskLoadError(f"{path}: row {n} 'answer' has no final number (expected '#### N')")
        examples.append(Example(prompt_text(question, tokenizer), {"question": question, "answer": reference}))
    return examples


def load(*, data: str | Path | None = None, tokenizer: Any = None, held_out_fraction: float = 0.1) -> DatasetTask:
    """The math task over a GSM8K-style JSONL file."""
    if data is None:
        raise TaskLoadError("the math task needs data=PATH to a GSM8K-style JSONL file (question, answer)")
    return dataset_task("math", REWARD_RANGE, load_examples(data, tokenizer), math_reward, held_out_fraction)
