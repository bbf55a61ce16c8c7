"""The scale bench's stand-in task: a reward every completion gets, fixed by its text alone."""

from __future__ import annotations

import zlib

from swarmtune.tasks.base import DatasetTask, Example

PROMPTS = tuple(f"{a}*{b}=" for a in range(10, 18) for b in range(2, 10))


def text_checksum(prompts: list[str], completions: list[str], **columns: list[object]) -> list[float]:
    """CRC-32 of each completion scaled to [0, 1): deterministic, and any change of text changes it,
    so a random model's members rank (never all tied) and the update does its full work."""
    return [zlib.crc32(text.encode()) / 2**32 for text in completions]


TASK = DatasetTask("scale-checksum", (0.0, 1.0), tuple(Example(p) for p in PROMPTS), (), text_checksum)
