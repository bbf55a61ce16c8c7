"""The `swarmtune` command line: the one place that knows every role."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each entry: (subcommand module under swarmtune.cli, one-line help). Modules expose
# `add_arguments(parser)` and `run(args) -> int`, and import heavy dependencies inside `run`
# so `--help` stays fast and a broken optional dependency only breaks its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "hash": ("hash_cmd", "print the canonical state hash of a model directory's genesis state"),
    "keygen": ("keygen_cmd", "create an Ed25519 key file for a worker or coordinator"),
    "ledger": ("ledger_cmd", "export, import or verify a job's ledger file"),
    "replay": ("replay_cmd", "rebuild a job's model state from its base model and ledger file; print its hash"),
    "worker": ("worker_cmd", "run a worker: evaluate members for a coordinator on this machine's CPU or GPU"),
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
