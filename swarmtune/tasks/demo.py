"""The demo tasks of builtin:tiny: two-digit addition (what ES improves) and string reversal (the retention probe)."""

from __future__ import annotations

import random
import re
import string
from typing import Any

from swarmtune.tasks.base import DatasetTask, Example

ADDITION_NAME = "demo-add"
REVERSAL_NAME = "demo-reverse"
REWARD_RANGE = (0.0, 1.0)
HELD_OUT_SIZE = 500
REVERSAL_TRAIN_SIZE = 20_000
REVERSAL_LENGTHS = (3, 6)  # inclusive range of reversed string lengths
# An inexact sum earns at most this much, so any exact answer outranks every near miss.
PARTIAL_CREDIT = 0.5
# The split seeds are part of the datasets' identity, and so of builtin:tiny's pretraining data.
ADDITION_SEED = 1
REVERSAL_SEED = 2
# The answer is the run of digits or lowercase letters a completion starts with: the tiny model
# ends it with <eos>, and whatever follows (a newline, more text, an undecoded <eos>) is ignored.
_ANSWER = re.compile(r"\s*([0-9a-z]*)")


def leading_answer(completion: str) -> str:
    """The answer a completion starts with ('' when it starts with anything else)."""
    match = _ANSWER.match(completion)
    return match.group(1) if match else ""


def exact_match(prompts: list[str], completions: list[str], answer: list[str]) -> list[float]:
    """TRL-style reward: 1.0 where the completion's leading answer is exactly the expected one.

    The accuracy to report for both demo tasks; the reversal probe's reward. Prompts are never scored.
    """
    return [float(leading_answer(completion) == target) for completion, target in zip(completions, answer)]


def addition_reward(prompts: list[str], completions: list[str], answer: list[str]) -> list[float]:
    """TRL-style reward of demo-add: 1.0 for the exact sum, partial credit per right-aligned digit."""
    return [digit_credit(leading_answer(completion), target) for completion, target in zip(completions, answer)]


def digit_credit(answer: str, target: str) -> float:
    """1 for the exact number, else PARTIAL_CREDIT times the share of right-aligned digits that match."""
    if answer == target:
        return 1.0
    width = max(len(answer), len(target))
    matching = sum(a == t for a, t in zip(answer.rjust(width), target.rjust(width)))
    return PARTIAL_CREDIT * matching / width


def addition_example(a: int, b: int) -> Example:
    """The exact format builtin:tiny was pretrained on: "23+45=" -> "68"."""
    return Example(prompt=f"{a}+{b}=", columns={"answer": str(a + b)})


def reversal_example(text: str) -> Example:
    """The exact format builtin:tiny was pretrained on: "abc>" -> "cba"."""
    return Example(prompt=f"{text}>", columns={"answer": text[::-1]})


def addition_task(tokenizer: Any = None) -> DatasetTask:
    """demo-add: every sum of two numbers in 0..99, a seeded 500 of them held out.

    tokenizer: accepted like every built-in task factory's; demo prompts are raw text.
    """
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(ADDITION_SEED).shuffle(pairs)
    examples = tuple(addition_example(a, b) for a, b in pairs)
    return DatasetTask(ADDITION_NAME, REWARD_RANGE, examples[HELD_OUT_SIZE:], examples[:HELD_OUT_SIZE], addition_reward)


def reversal_task(tokenizer: Any = None) -> DatasetTask:
    """demo-reverse: distinct seeded lowercase strings of 3-6 letters, the held-out ones never trained on.

    tokenizer: accepted like every built-in task factory's; demo prompts are raw text.
    """
    texts = distinct_strings(random.Random(REVERSAL_SEED), HELD_OUT_SIZE + REVERSAL_TRAIN_SIZE)
    examples = tuple(reversal_example(text) for text in texts)
    return DatasetTask(REVERSAL_NAME, REWARD_RANGE, examples[HELD_OUT_SIZE:], examples[:HELD_OUT_SIZE], exact_match)


def distinct_strings(rng: random.Random, count: int) -> list[str]:
    """count distinct random lowercase strings, in the order first drawn."""
    seen: dict[str, None] = {}  # an insertion-ordered set
    low, high = REVERSAL_LENGTHS
    while len(seen) < count:
        length = rng.randint(low, high)
        seen.setdefault("".join(rng.choice(string.ascii_lowercase) for _ in range(length)), None)
    return list(seen)
