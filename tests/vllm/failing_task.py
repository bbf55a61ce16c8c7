"""A task whose reward function fails: the worker must stop, and take its vLLM engine down with it."""

from __future__ import annotations

from swarmtune.tasks.base import DatasetTask, Example


def broken_reward(prompts: list[str], completions: list[str], **columns: list[object]) -> list[float]:
    raise RuntimeError("this reward function always fails (test task)")


TASK = DatasetTask("broken", (0.0, 1.0), tuple(Example(f"{a}+{a}=") for a in range(8)), (), broken_reward)
