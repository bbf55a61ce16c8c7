"""The demo tasks: deterministic disjoint splits, the pretraining formats, completion-only rewards."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from swarmtune.modelbuild import build_tokenizer
from swarmtune.tasks.base import Task, columns_of
from swarmtune.tasks.demo import (
    HELD_OUT_SIZE,
    PARTIAL_CREDIT,
    REVERSAL_LENGTHS,
    REVERSAL_TRAIN_SIZE,
    addition_reward,
    addition_task,
    exact_match,
    leading_answer,
    reversal_task,
)


def prompts_of(examples: object) -> set[str]:
    return {example.prompt for example in examples}  # type: ignore[attr-defined]


def test_addition_splits_cover_every_pair_once() -> None:
    task = addition_task()
    train, held_out = prompts_of(task.train()), prompts_of(task.held_out())
    assert (len(train), len(held_out)) == (10_000 - HELD_OUT_SIZE, HELD_OUT_SIZE)
    assert not train & held_out
    assert train | held_out == {f"{a}+{b}=" for a in range(100) for b in range(100)}


def test_reversal_splits_are_disjoint_and_in_range() -> None:
    task = reversal_task()
    train, held_out = prompts_of(task.train()), prompts_of(task.held_out())
    assert (len(train), len(held_out)) == (REVERSAL_TRAIN_SIZE, HELD_OUT_SIZE)
    assert not train & held_out
    low, high = REVERSAL_LENGTHS
    assert all(low <= len(prompt) - 1 <= high and prompt.endswith(">") for prompt in train | held_out)


@pytest.mark.parametrize("factory", [addition_task, reversal_task])
def test_tasks_are_deterministic_tasks(factory: object) -> None:
    first, second = factory(), factory(tokenizer=object())  # type: ignore[operator]
    assert isinstance(first, Task)
    assert first.reward_range == (0.0, 1.0)
    assert first.train() == second.train() and first.held_out() == second.held_out()


def test_formats_are_the_pretraining_formats() -> None:
    example = addition_task().held_out()[0]
    a, b = example.prompt.removesuffix("=").split("+")
    assert example.columns == {"answer": str(int(a) + int(b))}
    reversal = reversal_task().held_out()[0]
    assert reversal.columns == {"answer": reversal.prompt.removesuffix(">")[::-1]}


def test_every_prompt_and_answer_is_in_the_tiny_vocabulary(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    examples = [*addition_task().held_out(), *reversal_task().held_out()]
    text = "".join(example.prompt + example.columns["answer"] for example in examples)
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids


@pytest.mark.parametrize(
    ("completion", "answer"),
    [("68", "68"), (" 68", "68"), ("68\n12+3=", "68"), ("68<eos>", "68"), ("cba", "cba"), ("", ""), ("=68", "")],
)
def test_leading_answer(completion: str, answer: str) -> None:
    assert leading_answer(completion) == answer


def test_exact_match_scores_the_completion_only() -> None:
    prompts = ["23+45=68", "23+45=", "23+45=", "abc>cba"]
    completions = ["", "68", "681", "cb"]
    assert exact_match(prompts, completions, ["68", "68", "68", "cba"]) == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "target", "reward"),
    [
        ("68", "68", 1.0),
        ("67", "68", PARTIAL_CREDIT / 2),  # the tens digit is right
        ("168", "68", PARTIAL_CREDIT * 2 / 3),  # both digits right, one too many
        ("8", "68", PARTIAL_CREDIT / 2),
        ("99", "68", 0.0),
        ("", "68", 0.0),
        ("=68", "68", 0.0),  # not an answer at the start
    ],
)
def test_addition_reward_gives_digit_credit(completion: str, target: str, reward: float) -> None:
    assert addition_reward(["23+45="], [completion], [target]) == [reward]


def test_any_exact_sum_outranks_every_near_miss() -> None:
    targets = [str(n) for n in range(199)]
    near_misses = [str(n + 1) for n in range(199)]
    assert max(addition_reward([""] * 199, near_misses, targets)) <= PARTIAL_CREDIT


def test_task_rewards_take_trl_columns() -> None:
    task = addition_task()
    examples = list(task.held_out()[:3])
    completions = [example.columns["answer"] for example in examples]
    assert task.reward([e.prompt for e in examples], completions, **columns_of(examples)) == [1.0, 1.0, 1.0]
    probe = reversal_task()
    examples = list(probe.held_out()[:2])
    assert probe.reward([e.prompt for e in examples], ["zz", examples[1].columns["answer"]], **columns_of(examples)) == [0.0, 1.0]
