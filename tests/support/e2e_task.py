"""Tasks for the end-to-end tests: rewards a random tiny model's perturbations actually move."""

from __future__ import annotations

from swarmtune.tasks.base import DatasetTask, Example

PROMPTS = tuple(f"{a}+{b}=" for a in range(7) for b in range(6))


def digit_share(prompts: list[str], completions: list[str], **columns: list[object]) -> list[float]:
    """Share of digits in each completion: varies smoothly enough with the weights to rank members."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def letter_share(prompts: list[str], completions: list[str], **columns: list[object]) -> list[float]:
    return [sum(c.isalpha() for c in text) / max(1, len(text)) for text in completions]


TASK = DatasetTask("digits", (0.0, 1.0), tuple(Example(p) for p in PROMPTS[:36]), tuple(Example(p) for p in PROMPTS[36:]), digit_share)
RETENTION = DatasetTask("letters", (0.0, 1.0), (), tuple(Example(p) for p in PROMPTS[:4]), letter_share)
