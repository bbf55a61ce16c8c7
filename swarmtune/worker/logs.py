"""Structured worker logs: one event per line, human-readable or JSON lines."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


def render_human(event: str, fields: dict[str, Any]) -> str:
    details = " ".join(f"{key}={value}" for key, value in fields.items())
    return f"{time.strftime('%H:%M:%S')} worker {event}" + (f" {details}" if details else "")


def render_json(event: str, fields: dict[str, Any]) -> str:
    return json.dumps({"ts": round(time.time(), 6), "event": event, **fields}, default=str)


@dataclass(frozen=True)
class EventLog:
    """Writes events to a stream (stderr by default); JSON lines when `json_lines` is set."""

    json_lines: bool = False
    stream: TextIO | None = None

    def __call__(self, event: str, **fields: Any) -> None:
        line = render_json(event, fields) if self.json_lines else render_human(event, fields)
        out = self.stream or sys.stderr
        out.write(line + "\n")
        out.flush()
