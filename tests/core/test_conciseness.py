"""Conciseness: correctness × length penalty, normalisation, the built-in set and the JSONL loader."""

import json

import pytest

from swarmtune.tasks.base import TaskLoadError, columns_of
from swarmtune.tasks.conciseness import (
    BUILTIN_QA,
    answer_reward,
    conciseness_reward,
    load,
    matched_answers,
    normalise,
)


@pytest.mark.parametrize(
    ("completion", "answers", "expected"),
    [
        ("Paris", ["Paris"], 1.0),
        ("  Paris\n", ["Paris"], 1.0),  # surrounding whitespace is free
        ("paris", ["Paris"], 1.0),
        ("Paris.", ["Paris"], 5 / 6),
        ("The capital is Paris.", ["Paris"], 5 / 21),
        ("London", ["Paris"], 0.0),
        ("Parisian", ["Paris"], 0.0),  # whole words only
        ("", ["Paris"], 0.0),
        ("Leonardo da Vinci", ["Leonardo da Vinci", "da Vinci", "Leonardo"], 1.0),
        ("da Vinci", ["Leonardo da Vinci", "da Vinci", "Leonardo"], 1.0),
        ("It was da Vinci", ["Leonardo da Vinci", "da Vinci"], 8 / 15),
        ("The Pacific Ocean", ["Pacific Ocean"], 13 / 17),  # articles match but still cost length
        ("seven", ["7", "seven"], 1.0),
        ("7 continents", ["7", "seven"], 1 / 12),
        ("H2O", ["H2O"], 1.0),
    ],
)
def test_hand_checked_rewards(completion, answers, expected):
    assert answer_reward(completion, answers) == pytest.approx(expected)


def test_normalise():
    assert normalise("  The Blue-Whale, an animal!") == "blue whale animal"
    assert normalise("...") == ""


def test_matched_answers_keeps_order_and_skips_empty_answers():
    assert matched_answers("Neil Armstrong", ["Neil Armstrong", "Armstrong", "!!"]) == ["Neil Armstrong", "Armstrong"]


def test_reward_decreases_with_length_beyond_the_answer():
    lengths = [answer_reward("Paris" + " ok" * k, ["Paris"]) for k in range(6)]
    assert lengths[0] == 1.0 and all(a > b for a, b in zip(lengths, lengths[1:]))


def test_builtin_task_rewards_its_own_answers_fully():
    task = load()
    examples = [*task.train(), *task.held_out()]
    assert len(examples) == len(BUILTIN_QA) >= 30
    assert task.held_out() and task.reward_range == (0.0, 1.0)
    completions = [e.columns["answers"][0] for e in examples]
    assert task.reward([e.prompt for e in examples], completions, **columns_of(examples)) == [1.0] * len(examples)
    assert examples[0].prompt.startswith("User: ") and examples[0].prompt.endswith("\nAssistant:")


def test_batch_reward_signature():
    assert conciseness_reward(["q1", "q2"], ["Tokyo", "Kyoto"], answers=[["Tokyo"], ["Tokyo"]]) == [1.0, 0.0]


def test_jsonl_loader(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": "Capital of Peru?", "answers": ["Lima"]}, {"question": "2 + 2?", "answer": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load(data=path, held_out_fraction=0.0)
    assert [dict(e.columns) for e in task.train()] == [
        {"question": "Capital of Peru?", "answers": ["Lima"]},
        {"question": "2 + 2?", "answers": ["4"]},
    ]
    assert task.train()[0].prompt == "User: Capital of Peru?\nAssistant:"


@pytest.mark.parametrize(
    "row",
    [{"question": "q"}, {"question": "q", "answers": []}, {"question": "q", "answers": ["?"]}, {"answer": "a"}],
)
def test_loader_rejects_bad_rows(tmp_path, row):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(row))
    with pytest.raises(TaskLoadError, match="row 1"):
        load(data=path)
