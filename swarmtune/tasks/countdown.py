"""Countdown as in Qiu et al. (TinyZero's prompt): prompts, the 0.1·format + answer reward, and data.

The prompt ends with the assistant prefix `Let me solve this step by step.\\n<think>`, so the
completion starts inside the think block. The reward, as in the paper's `countdown_task.py`, reads
the completion only (the prompt's own example `<answer> (1 + 2) / 3 </answer>` is never scored):

    response = "<think>" + completion.rstrip()          # re-open the block the prefix opened
    format   = 1.0  if response fully matches  <think>.*?</think>\\n<answer>.*?</answer>
                    (regex fullmatch, `.` matching newlines)
               else 0.1·[response contains <think>.*?</think>] + 0.5·[it contains <answer>.*?</answer>]
    answer   = 1.0  if the LAST <answer>…</answer> in the completion is a valid `arith` expression
                    whose numbers are exactly the given numbers (as a multiset: each once, all of
                    them) and whose exact rational value equals the target
               else 0.0
    reward   = 0.1·format + answer                      ∈ [0, 1.1]

Deliberate differences from the paper's code: the answer is evaluated exactly by
`swarmtune.tasks.arith` instead of Python `eval` with a 1e-5 tolerance, so `**` (power) and `//`
(floor division) are rejected; whitespace around the answer expression and at the end of the
completion is ignored (the paper tolerated only a final newline). Completions must be decoded
without special tokens (the paper stripped an optional end token).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from swarmtune.tasks.arith import evaluate
from swarmtune.tasks.base import (
    DatasetTask,
    Example,
    TaskLoadError,
    chat,
    dataset_task,
    has_chat_template,
    read_records,
    render_prompt,
)

INSTRUCTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
    "<answer> (1 + 2) / 3 </answer>."
)
# TinyZero's base-model preamble, the start of raw (template-free) prompts.
PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer."
)
# TinyZero's system message for instruct models, typo included, as those runs used it.
CHAT_SYSTEM = (
    "You are a helpful assistant. You first thinks about the reasoning process in the mind and then "
    "provides the user with the answer."
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"
REWARD_RANGE = (0.0, 1.1)
_MAX_DRAWS = 10_000

_THINK, _END_THINK, _ANSWER, _END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"


@dataclass(frozen=True)
class Puzzle:
    """One Countdown instance: reach `target` using each of `numbers` exactly once."""

    numbers: tuple[int, ...]
    target: int
    context: str | None = None  # the paper's pre-rendered prompt; used verbatim for raw prompts
    solution: str | None = None  # an expression known to solve it (generated puzzles)


# The tag checks below are linear scans equivalent to the paper's lazy DOTALL regexes, whose
# backtracking is quadratic: 40 kB of repeated tags took seconds per completion.


def format_reward(completion: str) -> float:
    """The paper's format score of a completion that continues the `<think>` prefix."""
    response = _THINK + completion.rstrip()
    # fullmatch of <think>.*?</think>\n<answer>.*?</answer>
    if response.endswith(_END_ANSWER) and _END_THINK + "\n" + _ANSWER in response[len(_THINK) : -len(_END_ANSWER)]:
        return 1.0
    return 0.1 * _has_block(response, _THINK, _END_THINK) + 0.5 * _has_block(response, _ANSWER, _END_ANSWER)


def _has_block(text: str, opening: str, closing: str) -> bool:
    """Whether re.search(opening + ".*?" + closing, text, re.DOTALL) would match."""
    start = text.find(opening)
    return start >= 0 and text.find(closing, start + len(opening)) >= 0


def last_answer(completion: str) -> str | None:
    """The last group re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL) would return."""
    found, pos = None, 0
    while (start := completion.find(_ANSWER, pos)) >= 0:
        end = completion.find(_END_ANSWER, start + len(_ANSWER))
        if end < 0:
            break
        found, pos = completion[start + len(_ANSWER) : end], end + len(_END_ANSWER)
    return found


def answer_reward(completion: str, numbers: Sequence[int], target: int) -> float:
    """1.0 when the last `<answer>` uses exactly `numbers` and equals `target` exactly, else 0.0."""
    answer = last_answer(completion)
    if answer is None:
        return 0.0
    result = evaluate(answer.strip())
    solved = result.valid and result.numbers == tuple(sorted(numbers)) and result.value == target
    return 1.0 if solved else 0.0


def countdown_reward(
    prompts: list[Any], completions: list[str], *, numbers: list[Sequence[int]], target: list[int], **_: Any
) -> list[float]:
    """TRL-style batch reward, 0.1·format + answer per completion; prompts are never read."""
    rows = zip(completions, numbers, target, strict=True)
    return [0.1 * format_reward(c) + answer_reward(c, nums, t) for c, nums, t in rows]


def prompt_text(puzzle: Puzzle, tokenizer: Any = None) -> str:
    """The puzzle's prompt, ending with the assistant prefix.

    With a chat template: TinyZero's Qwen-instruct chat. Without one: the row's `context` (the
    paper's rendered prompt) when present, else TinyZero's base-model text.
    """
    user = INSTRUCTION.format(numbers=list(puzzle.numbers), target=puzzle.target)
    if has_chat_template(tokenizer):
        return render_prompt(chat(user, CHAT_SYSTEM), tokenizer, ASSISTANT_PREFIX)
    if puzzle.context is not None:
        return puzzle.context
    return render_prompt(chat(user, PREAMBLE), None, ASSISTANT_PREFIX)


def example_of(puzzle: Puzzle, tokenizer: Any = None) -> Example:
    return Example(prompt_text(puzzle, tokenizer), {"numbers": list(puzzle.numbers), "target": puzzle.target})


def puzzle_of(row: dict[str, Any], where: str = "row") -> Puzzle:
    """A Puzzle from a paper-format row: `numbers` (or HF's `nums`), `target`, optional `context`."""
    numbers, target, context = row.get("numbers", row.get("nums")), row.get("target"), row.get("context")
    if not isinstance(numbers, list) or not numbers or not all(_is_int(n) for n in numbers):
        raise TaskLoadError(f"{where}: 'numbers' must be a non-empty list of integers")
    if not _is_int(target):
        raise TaskLoadError(f"{where}: 'target' must be an integer")
    if context is not None and not isinstance(context, str):
        raise TaskLoadError(f"{where}: 'context' must be a string")
    return Puzzle(tuple(int(n) for n in numbers), int(target), context)


def _is_int(value: Any) -> bool:
    # The paper's JSON stores the target as a digit string; bool is an int subclass but no number here.
    if isinstance(value, str):
        return value.isascii() and value.isdecimal()
    return isinstance(value, int) and not isinstance(value, bool)


def load_puzzles(path: str | Path) -> list[Puzzle]:
    """Puzzles from the paper's JSON array or a JSONL file."""
    return [puzzle_of(row, f"{path}: row {n}") for n, row in enumerate(read_records(path), 1)]


def generate_puzzles(
    count: int, seed: int, sizes: Sequence[int] = (3, 4), max_number: int = 99, max_target: int = 100
) -> list[Puzzle]:
    """`count` solvable puzzles, deterministic in `seed`: random expressions over random numbers.

    Each puzzle draws len ∈ `sizes` numbers from [1, max_number], combines them in a random binary
    tree of + - * /, and is kept when the exact value is an integer in [1, max_target]; the tree is
    kept as `solution`, so every puzzle is solvable by construction.
    """
    if count < 0 or not sizes or min(sizes) < 2 or max_number < 1:
        raise TaskLoadError("generate_puzzles needs count >= 0, sizes of at least 2 numbers, max_number >= 1")
    rng = random.Random(seed)
    return [_solvable_puzzle(rng, sizes, max_number, max_target) for _ in range(count)]


def _solvable_puzzle(rng: random.Random, sizes: Sequence[int], max_number: int, max_target: int) -> Puzzle:
    # Bounded so that parameters with (almost) no valid puzzle fail instead of looping forever.
    for _ in range(_MAX_DRAWS):
        numbers = [rng.randint(1, max_number) for _ in range(rng.choice(sizes))]
        solution = _random_expression(numbers, rng)
        value = evaluate(solution).value
        if value is not None and value.denominator == 1 and 1 <= value <= max_target:
            return Puzzle(tuple(numbers), int(value), solution=solution)
    raise TaskLoadError(f"no puzzle with a target in [1, {max_target}] in {_MAX_DRAWS} draws; widen the ranges")


def _random_expression(numbers: Sequence[int], rng: random.Random) -> str:
    terms = [str(n) for n in numbers]
    while len(terms) > 1:
        left = terms.pop(rng.randrange(len(terms)))
        right = terms.pop(rng.randrange(len(terms)))
        terms.append(f"({left} {rng.choice('+-*/')} {right})")
    return terms[0][1:-1]


def load(
    *,
    data: str | Path | None = None,
    count: int = 1000,
    seed: int = 0,
    tokenizer: Any = None,
    held_out_fraction: float = 0.1,
) -> DatasetTask:
    """The Countdown task over `data` (paper JSON/JSONL) or `count` generated puzzles from `seed`."""
    puzzles = load_puzzles(data) if data is not None else generate_puzzles(count, seed)
    examples = [example_of(p, tokenizer) for p in puzzles]
    return dataset_task("countdown", REWARD_RANGE, examples, countdown_reward, held_out_fraction)
