"""Job specs for tests: the one place that writes a job's TOML, table by table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Union

Value = Union[str, Path, bool, int, float, list["Value"], Mapping[str, "Value"]]
Table = Mapping[str, Value]


def toml_value(value: Value) -> str:
    """One TOML value: strings (and paths) quoted, lists and inline tables nested."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"


def job_spec(
    job_id: str,
    *,
    model: str | Path,
    task: Table,
    seed: int,
    iterations: int | None = None,
    es: Table | None = None,
    noise: Table | None = None,
    schedule: Table | None = None,
    retention: Table | None = None,
) -> str:
    """A job spec with [job] and [task], and each other table that is given (empty tables are left out)."""
    job: dict[str, Value] = {"id": job_id, "seed": seed, "model": model}
    if iterations is not None:
        job["iterations"] = iterations
    tables = {"job": job, "task": task, "es": es, "noise": noise, "schedule": schedule, "retention": retention}
    return "\n".join(
        f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
        for name, table in tables.items()
        if table
    )
