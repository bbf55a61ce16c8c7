"""Conciseness (Qiu et al.'s second task): short factual answers, reward = correctness × conciseness.

    normalise(s)  = lower-case s, replace every non-alphanumeric character by a space, drop the
                    words a/an/the, and join the remaining words with single spaces
    matched       = the accepted answers a with normalise(a) occurring as whole words in
                    normalise(completion)
    correct       = 1 if some answer is matched, else 0
    conciseness   = min(1, L_ref / L), L = characters of the stripped completion,
                    L_ref = characters of the longest matched answer
    reward        = correct × conciseness                                  ∈ [0, 1]

Stating exactly one accepted answer ("Paris", or "Leonardo da Vinci" as well as "da Vinci") earns
1; every extra character lowers the reward, like the paper's length penalty towards the reference
answer. Multiplying by correctness keeps an empty or off-topic short reply at 0, so brevity alone
earns nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from swarmtune.tasks.base import DatasetTask, Example, TaskLoadError, chat, dataset_task, read_records, render_prompt

REWARD_RANGE = (0.0, 1.0)

_ARTICLES = frozenset({"a", "an", "the"})
_NON_ALNUM = re.compile(r"[^0-9a-z]+")

# A small built-in set: (question, accepted answers).
BUILTIN_QA: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in the Solar System?", ("Jupiter",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the chemical symbol for sodium?", ("Na",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2")),
    ("How many continents are there?", ("7", "seven")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many days are there in a leap year?", ("366",)),
    ("How many sides does a hexagon have?", ("6", "six")),
    ("What is 12 times 12?", ("144",)),
    ("What is the square root of 81?", ("9", "nine")),
    ("What is the boiling point of water at sea level in degrees Celsius?", ("100",)),
    ("What is the largest ocean on Earth?", ("Pacific", "Pacific Ocean")),
    ("What is the longest river in South America?", ("Amazon", "Amazon River")),
    ("What is the tallest mountain above sea level?", ("Everest", "Mount Everest")),
    ("Who wrote 'Romeo and Juliet'?", ("Shakespeare", "William Shakespeare")),
    ("Who painted the Mona Lisa?", ("Leonardo da Vinci", "da Vinci", "Leonardo")),
    ("Who developed the theory of general relativity?", ("Einstein", "Albert Einstein")),
    ("Who was the first person to walk on the Moon?", ("Neil Armstrong", "Armstrong")),
    ("In which year did World War II end?", ("1945",)),
    ("In which year did the Berlin Wall fall?", ("1989",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("What is the smallest prime number?", ("2", "two")),
    ("What is the freezing point of water in degrees Fahrenheit?", ("32",)),
    ("Which element has atomic number 1?", ("hydrogen",)),
    ("What is the main language spoken in Brazil?", ("Portuguese",)),
    ("What currency is used in Japan?", ("yen", "Japanese yen")),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("What is the largest mammal?", ("blue whale",)),
    ("How many minutes are there in an hour?", ("60", "sixty")),
)


def normalise(text: str) -> str:
    """Lower-case words without punctuation or articles, joined by single spaces."""
    return " ".join(w for w in _NON_ALNUM.sub(" ", text.lower()).split() if w not in _ARTICLES)


def matched_answers(completion: str, answers: Sequence[str]) -> list[str]:
    """The accepted answers that appear as whole words in the completion (after `normalise`)."""
    padded = f" {normalise(completion)} "
    return [a for a in answers if normalise(a) and f" {normalise(a)} " in padded]


def answer_reward(completion: str, answers: Sequence[str]) -> float:
    """correct × min(1, longest matched answer length / stripped completion length), in characters."""
    matched = matched_answers(completion, answers)
    return min(1.0, max(map(len, matched)) / len(completion.strip())) if matched else 0.0


def conciseness_reward(
    prompts: list[Any], completions: list[str], *, answers: list[Sequence[str]], **_: Any
) -> list[float]:
    """TRL-style batch reward: correctness × conciseness per completion."""
    rows = zip(completions, answers, strict=True)
    return [answer_reward(c, accepted) for c, accepted in rows]


def example_of(question: str, answers: Sequence[str], tokenizer: Any = None) -> Example:
    return Example(render_prompt(chat(question), tokenizer), {"question": question, "answers": list(answers)})


def builtin_examples(tokenizer: Any = None) -> list[Example]:
    return [example_of(question, answers, tokenizer) for question, answers in BUILTIN_QA]


def load_examples(path: str | Path, tokenizer: Any = None) -> list[Example]:
    """Examples from JSONL rows: `question` and `answers` (a list) or `answer` (one string)."""
    examples = []
    for n, row in enumerate(read_records(path), 1):
        question, answers = row.get("question"), row.get("answers", [row.get("answer")])
        if not isinstance(answers, list):
            answers = [answers]
        valid = answers and all(isinstance(a, str) and normalise(a) for a in answers)
        if not isinstance(question, str) or not valid:
            raise TaskLoadError(f"{path}: row {n} needs 'question' and non-empty 'answers' (or 'answer')")
        examples.append(example_of(question, answers, tokenizer))
    return examples


def load(*, data: str | Path | None = None, tokenizer: Any = None, held_out_fraction: float = 0.1) -> DatasetTask:
    """The conciseness task over `data` (JSONL) or the built-in questions."""
    examples = load_examples(data, tokenizer) if data is not None else builtin_examples(tokenizer)
    return dataset_task("conciseness", REWARD_RANGE, examples, conciseness_reward, held_out_fraction)
