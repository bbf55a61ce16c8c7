"""GSM8K-style final-number extraction and matching, and the JSONL loader."""

import json
from fractions import Fraction

import pytest

from swarmtune.tasks.base import TaskLoadError, columns_of
from swarmtune.tasks.math_answer import final_number, load, math_reward, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),
        ("#### 1,234", 1234),
        ("#### -5", -5),
        ("#### $18.00", 18),
        ("#### 3/4", Fraction(3, 4)),
        ("#### 42 apples\nThen 17 more", 42),  # the line after #### only
        ("so 6 * 7 = 42. #### 42. Check: 40 + 2", 42),
        ("The answer is \\boxed{42}.", 42),
        ("\\boxed{\\frac{3}{4}} and later 9", Fraction(3, 4)),
        ("\\boxed{\\dfrac{1}{2}}", Fraction(1, 2)),
        ("\\boxed{1} then \\boxed{-2,500}", -2500),
        ("first 3, then 5, the answer is 18.", 18),
        ("It costs $1,000.50 in total", Fraction(200_100, 200)),
        ("0.5", Fraction(1, 2)),
        ("5-3", 3),  # a hyphen between numbers is not a sign
        ("x = -3", -3),
        ("no numbers here", None),
        ("#### no number", None),
        ("\\boxed{} 7", None),
        ("divide 1/0", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == (None if expected is None else Fraction(expected))


def test_parse_number():
    assert parse_number("-1,234.5") == Fraction(-2469, 2)
    assert parse_number("3 / 4") == Fraction(3, 4)
    assert parse_number("+7") == 7


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She has 72 clips. #### 72", 1.0),
        ("The total is \\boxed{72}", 1.0),
        ("48 + 24 = 72", 1.0),
        ("72.00", 1.0),
        ("48 + 24 = 72, so not 71", 0.0),
        ("#### 71", 0.0),
        ("", 0.0),
    ],
)
def test_reward_against_gsm8k_reference(completion, expected):
    assert math_reward(["q"], [completion], answer=["48 + 24 = <<48+24=72>>72\n#### 72"]) == [expected]


def test_reward_with_fractional_and_comma_references():
    completions = ["#### 0.75", "#### 1000", "#### -3"]
    assert math_reward(["a", "b", "c"], completions, answer=["#### 3/4", "#### 1,000", "#### -3"]) == [1.0] * 3


def test_jsonl_loader_and_task(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {n} + {n}?", "answer": f"{n} + {n} = {2 * n}\n#### {2 * n}"} for n in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load(data=path, held_out_fraction=0.25)
    assert len(task.held_out()) == 5 and len(task.train()) == 15
    example = task.train()[0]
    assert example.prompt.startswith("User: What is ")
    assert example.prompt.endswith('Let\'s think step by step and output the final answer after "####".\nAssistant:')
    examples = list(task.train())
    completions = [f"#### {e.columns['answer'].rsplit('#### ', 1)[1]}" for e in examples]
    assert task.reward([e.prompt for e in examples], completions, **columns_of(examples)) == [1.0] * 15


@pytest.mark.parametrize(
    ("row", "message"),
    [({"question": "q"}, "'question' and 'answer'"), ({"question": "q", "answer": "none"}, "final number")],
)
def test_loader_errors(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row))
    with pytest.raises(TaskLoadError, match=message):
        load(data=path)


def test_math_task_needs_data():
    with pytest.raises(TaskLoadError, match="data="):
        load()
