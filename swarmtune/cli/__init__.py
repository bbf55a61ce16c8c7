"""The `swarmtune` command line: the one place that knows every role."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each entry: (subcommand module under swarmtune.cli, one-line help). Modules expose
# `add_arguments(parser)` and `run(args) -> int`. Imported lazily so `--help` stays fast
# and a broken optional dependency only breaks its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "hash": ("hash_cmd", "print the canonical state hash of a model directory's genesis state"),
}


class CommandError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmtune",
        description="Decentralized, bit-exact Evolution Strategies fine-tuning of language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"swarmtune.cli.{module}")
        mod.add_arguments(command_parser)
        command_parser.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except CommandError as exc:
        print(f"swarmtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"swarmtune {args.command}: interrupted", file=sys.stderr)
        return 130
