"""Countdown: the paper's prompt, hand-checked rewards (incl. the prompt-text trap), loader, generator."""

import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmtune.tasks.arith import evaluate
from swarmtune.tasks.base import TaskLoadError, columns_of
from swarmtune.tasks.countdown import (
    Puzzle,
    answer_reward,
    countdown_reward,
    format_reward,
    generate_puzzles,
    last_answer,
    load,
    load_puzzles,
    prompt_text,
)
from tests.support.chat_tokenizer import tokenizer

RAW_PROMPT_1_2_3 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer.\nUser: Using the numbers [1, 2, 3], create an equation that equals 1. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
    "<answer> (1 + 2) / 3 </answer>.\nAssistant: Let me solve this step by step.\n<think>"
)


def reward(completion: str, numbers, target: int, prompt: str = "") -> float:
    return countdown_reward([prompt], [completion], numbers=[list(numbers)], target=[target])[0]


def test_raw_prompt_is_tinyzero_base_template():
    assert prompt_text(Puzzle((1, 2, 3), 1)) == RAW_PROMPT_1_2_3


def test_chat_template_prompt_ends_with_assistant_prefix():
    text = prompt_text(Puzzle((44, 19, 35), 98), tokenizer())
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant. You first thinks")
    assert "<|im_start|>user\nUsing the numbers [44, 19, 35], create an equation that equals 98." in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step.\n<think>")


def test_tokenizer_without_chat_template_gives_raw_text():
    assert prompt_text(Puzzle((1, 2, 3), 1), tokenizer(None)) == RAW_PROMPT_1_2_3


def test_context_is_used_verbatim_for_raw_prompts_only():
    puzzle = Puzzle((1, 2, 3), 1, context="PAPER PROMPT")
    assert prompt_text(puzzle) == "PAPER PROMPT"
    assert "Using the numbers [1, 2, 3]" in prompt_text(puzzle, tokenizer())


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # perfect: format 1.0 and answer 1.0
        (" 1 + 2 = 3, 3 * 3 = 9 </think>\n<answer>(1 + 2) * 3</answer>", 1.1),
        # perfect format, wrong value: format only
        (" hmm </think>\n<answer>1 + 2 + 3</answer>", 0.1),
        # perfect format, trailing whitespace and spaces inside the answer tag
        ("x</think>\n<answer> (1 + 2) * 3 </answer>\n\n", 1.1),
        # correct answer, text after it breaks the full format: 0.1·(0.1 + 0.5) + 1
        ("x</think>\n<answer>(1 + 2) * 3</answer> done", 1.06),
        # no newline between the blocks: partial format
        ("x</think><answer>(1 + 2) * 3</answer>", 1.06),
        # the think block never closes: answer tag only, 0.1·0.5
        ("thinking <answer>1 + 2</answer>", 0.05),
        # think closes, no answer: 0.1·0.1
        ("thinking </think> I give up", 0.01),
        ("", 0.0),
        ("no tags at all", 0.0),
    ],
)
def test_hand_checked_rewards(completion, expected):
    assert reward(completion, [1, 2, 3], 9) == pytest.approx(expected)


def test_prompt_text_trap_prompt_is_never_scored():
    # The prompt's own example "<answer> (1 + 2) / 3 </answer>" solves numbers [1, 2, 3], target 1.
    prompt = prompt_text(Puzzle((1, 2, 3), 1))
    completion = " I am not sure.</think>\n"
    assert answer_reward(prompt + completion, [1, 2, 3], 1) == 1.0  # the trap is real
    assert reward(completion, [1, 2, 3], 1, prompt=prompt) == pytest.approx(0.01)
    assert reward("", [1, 2, 3], 1, prompt=prompt) == 0.0


def test_only_the_last_answer_counts():
    right, wrong = "<answer>(1 + 2) * 3</answer>", "<answer>1 + 2 + 3</answer>"
    assert answer_reward(f"x</think>\n{wrong} no wait {right}", [1, 2, 3], 9) == 1.0
    assert answer_reward(f"x</think>\n{right} no wait {wrong}", [1, 2, 3], 9) == 0.0


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("5 + 3 + 2", 1.0),
        ("(5 + 3 + 2)", 1.0),
        ("2 * 5", 0.0),  # 3 is missing
        ("2 * 5 * 3 / 3", 0.0),  # 3 used twice
        ("5 + 5", 0.0),  # 5 reused, 2 and 3 missing
        ("2 * (3 + 5) - 6", 0.0),  # 6 is not given
        ("(3 + 2) * 5 / 2.5", 0.0),  # decimals are not Countdown numbers
        ("2 * 5 / (3 - 3)", 0.0),  # 3 twice, and division by zero
        ("2 ** 5 - 3", 0.0),  # power is not an allowed operation
        ("import os", 0.0),
        ("5 * 3 - 2 - 3", 0.0),  # right numbers, wrong value
    ],
)
def test_numbers_must_be_used_exactly_once_each(expression, expected):
    assert answer_reward(f"<answer>{expression}</answer>", [2, 3, 5], 10) == expected


def test_exact_division():
    assert answer_reward("<answer>6 / 4 * 4</answer>", [4, 6, 4], 6) == 1.0
    assert answer_reward("<answer>(6 / 4) * 4</answer>", [6, 4, 4], 6) == 1.0
    assert answer_reward("<answer>7 / 3 * 3</answer>", [7, 3, 3], 7) == 1.0
    assert answer_reward("<answer>6 / 4</answer>", [6, 4], 1) == 0.0  # 3/2, not 1


def test_batch_reward_through_task_columns():
    task = load(count=20, seed=3, held_out_fraction=0.0)
    examples = list(task.train())
    completions = [f"x</think>\n<answer>{p.solution}</answer>" for p in generate_puzzles(20, 3)]
    rewards = task.reward([e.prompt for e in examples], completions, **columns_of(examples))
    assert rewards == pytest.approx([1.1] * 20)
    assert task.reward_range == (0.0, 1.1)


def test_format_reward_values():
    assert format_reward(" a </think>\n<answer>1</answer>") == 1.0
    assert format_reward(" a </think>\n\n<answer>1</answer>") == pytest.approx(0.6)
    assert format_reward("<answer>1</answer>") == 0.5
    assert format_reward("</think>") == pytest.approx(0.1)


@pytest.mark.parametrize("seed", range(100))
def test_generated_puzzles_are_solvable(seed):
    for puzzle in generate_puzzles(10, seed):
        assert len(puzzle.numbers) in (3, 4)
        assert all(1 <= n <= 99 for n in puzzle.numbers)
        assert 1 <= puzzle.target <= 100
        result = evaluate(puzzle.solution)
        assert result.value == puzzle.target and result.numbers == tuple(sorted(puzzle.numbers))
        assert reward(f"x</think>\n<answer>{puzzle.solution}</answer>", puzzle.numbers, puzzle.target) == 1.1


def test_generator_is_deterministic_and_seed_dependent():
    assert generate_puzzles(30, 7) == generate_puzzles(30, 7)
    assert generate_puzzles(30, 7) != generate_puzzles(30, 8)
    assert generate_puzzles(5, 7) == generate_puzzles(30, 7)[:5]
    assert {len(p.numbers) for p in generate_puzzles(200, 0)} == {3, 4}
    assert [len(p.numbers) for p in generate_puzzles(20, 0, sizes=(4,))] == [4] * 20


def test_generator_rejects_bad_parameters():
    with pytest.raises(TaskLoadError):
        generate_puzzles(5, 0, sizes=(1,))
    with pytest.raises(TaskLoadError, match="draws"):
        generate_puzzles(5, 0, max_target=0)


def test_loader_reads_paper_json_and_jsonl(tmp_path):
    paper = tmp_path / "countdown.json"
    rows = [
        {"context": "PROMPT A", "target": "24", "numbers": [3, 8, 1]},
        {"target": 10, "numbers": [2, 3, 5]},
    ]
    paper.write_text(json.dumps(rows))
    assert load_puzzles(paper) == [Puzzle((3, 8, 1), 24, "PROMPT A"), Puzzle((2, 3, 5), 10)]
    hf = tmp_path / "countdown.jsonl"
    hf.write_text('{"nums": [44, 19, 35], "target": 98}\n\n{"numbers": [1, 2], "target": 3}\n')
    assert load_puzzles(hf) == [Puzzle((44, 19, 35), 98), Puzzle((1, 2), 3)]
    task = load(data=paper, held_out_fraction=0.0)
    assert [e.prompt for e in task.train()][0] == "PROMPT A"
    assert [dict(e.columns) for e in task.train()] == [
        {"numbers": [3, 8, 1], "target": 24},
        {"numbers": [2, 3, 5], "target": 10},
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"numbers": [1, 2]}', "target"),
        ('{"numbers": "1 2", "target": 3}', "numbers"),
        ('{"numbers": [1, true], "target": 3}', "numbers"),
        ('{"numbers": [1, 2], "target": 3.5}', "target"),
        ('{"numbers": [1, 2], "target": 3, "context": 5}', "context"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_loader_errors_name_the_row(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(TaskLoadError, match=message):
        load_puzzles(path)


def test_loader_missing_file(tmp_path):
    with pytest.raises(TaskLoadError, match="not found"):
        load(data=tmp_path / "missing.json")


def test_task_split_is_deterministic_and_disjoint():
    first, second = load(count=200, seed=1), load(count=200, seed=1)
    assert first.train() == second.train() and first.held_out() == second.held_out()
    assert len(first.held_out()) == 20 and len(first.train()) == 180
    assert not set(map(id, first.train())) & set(map(id, first.held_out()))
    assert not {e.prompt for e in first.train()} & {e.prompt for e in first.held_out()}


def _paper_format_reward(response: str) -> float:
    """The paper's format_reward_function, regexes and all, for equivalence checks."""
    if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", response, re.DOTALL):
        return 1.0
    think = re.search(r"<think>.*?<\/think>", response, re.DOTALL)
    answer = re.search(r"<answer>.*?<\/answer>", response, re.DOTALL)
    return 0.1 * bool(think) + 0.5 * bool(answer)


_fragments = st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "\n", "1 + 2", " ", "x"]))


@settings(max_examples=200, deadline=None)
@given(_fragments.map("".join))
def test_tag_scans_match_the_paper_regexes(completion):
    stripped = completion.rstrip()
    assert format_reward(completion) == _paper_format_reward("<think>" + stripped)
    answers = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    assert last_answer(completion) == (answers[-1] if answers else None)


@pytest.mark.parametrize(
    "completion",
    ["<answer>" * 20000, "<think>" * 20000, "</think>\n<answer>" * 10000, "<answer>(" * 10000 + "</answer>"],
)
def test_adversarial_tag_spam_is_fast(completion):
    start = time.perf_counter()
    reward(completion, [1, 2, 3], 6)
    assert time.perf_counter() - start < 0.1
