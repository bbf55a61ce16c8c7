"""A model-free task for coordinator tests: only its reward range matters to the coordinator."""

from swarmtune.tasks.base import DatasetTask, Example


def _zero(prompts: list[str], completions: list[str], **columns: list[object]) -> list[float]:
    return [0.0] * len(completions)


TASK = DatasetTask("sim", (0.0, 1.0), (Example("1+1="),), (Example("2+2="),), _zero)
