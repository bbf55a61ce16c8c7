"""Runs `swarmtune` subcommands in-process, through the real `main`, with only the named commands."""

from __future__ import annotations

import pytest

from swarmtune import cli


def run_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """Exit code of `swarmtune argv...`; only argv[0]'s module is loaded (others may be absent)."""
    monkeypatch.setattr(cli, "COMMANDS", {argv[0]: cli.COMMANDS[argv[0]]})
    return cli.main(list(argv))
