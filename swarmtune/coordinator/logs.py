"""Structured coordinator logs: `event key=value` lines, or JSON lines with --log-json."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def fields_of(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {"ts": round(record.created, 6), "level": record.levelname.lower(), "event": record.getMessage()}
        return json.dumps({**payload, **fields_of(record)}, default=str)


class Human(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        details = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp} coordinator {record.levelname.lower()} {record.getMessage()}" + (f" {details}" if details else "")


def configure(json_lines: bool, level: int = logging.INFO) -> None:
    """Send swarmtune.coordinator logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else Human())
    logger = logging.getLogger("swarmtune.coordinator")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
