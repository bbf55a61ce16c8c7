"""The `swarmtune` command line: the one place that knows every role."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

INTERRUPTED = 130  # the shell's status for a Ctrl-C'd program (128 + SIGINT)
# The Redis URL of commands given no ledger source: lets a container take the password from its
# environment instead of its command line (docker/).
REDIS_URL_ENV = "SWARMTUNE_REDIS_URL"
OTHER_SOURCES = ("data_dir", "ledger", "coordinator")

# Each entry: (subcommand module under swarmtune.cli, one-line help). Modules expose
# `add_arguments(parser)` and `run(args) -> int`, and import heavy dependencies inside `run`
# so `--help` stays fast and a broken optional dependency only breaks its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("audit_cmd", "verify a ledger end to end: chain, signatures, admissions, coefficients, and with --replay every attested hash"),
    "coordinator": ("coordinator_cmd", "run a job's coordinator: publish iterations, collect signed rewards, append the ledger"),
    "demo": ("demo_cmd", "run the whole system on this machine: ES fine-tunes a tiny model with 2 workers, then audits and plots it"),
    "export": ("export_cmd", "write a Hugging Face model directory of a job at any iteration, replayed from its ledger"),
    "hash": ("hash_cmd", "print the canonical state hash of a model directory's genesis state"),
    "keygen": ("keygen_cmd", "create an Ed25519 key file for a worker or coordinator"),
    "ledger": ("ledger_cmd", "export, import or verify a job's ledger file; repair its head record in Redis"),
    "plot": ("plot_cmd", "draw a job's reward and retention curves from its ledger (PNG)"),
    "replay": ("replay_cmd", "rebuild a job's model state from its base model and ledger file; print its hash"),
    "snapshot": ("snapshot_cmd", "write a job's state at a checkpointed iteration, replayed from its ledger, for workers joining late"),
    "status": ("status_cmd", "show a job at a glance: progress, rewards, retention, workers (live from its coordinator or from Redis)"),
    "worker": ("worker_cmd", "run a worker: evaluate members for a coordinator on this machine's CPU or GPU"),
}


class CommandError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


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


def source_required() -> bool:
    """Whether a command must be told where its ledger is: not when $SWARMTUNE_REDIS_URL says it."""
    return not os.environ.get(REDIS_URL_ENV)


def redis_url_from_env(args: argparse.Namespace) -> None:
    """`--redis-url` from $SWARMTUNE_REDIS_URL, for a command that takes one and was given no source."""
    takes_url = hasattr(args, "redis_url") and args.redis_url is None
    if takes_url and not any(getattr(args, name, None) for name in OTHER_SOURCES):
        args.redis_url = os.environ.get(REDIS_URL_ENV) or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    redis_url_from_env(args)
    try:
        return int(args._module.run(args) or 0)
    except CommandError as exc:
        print(f"swarmtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Wound down already: a second Ctrl-C (or one still pending) must not cut the exit short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"swarmtune {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


def entry() -> None:
    """The `swarmtune` program: main's exit status, and nothing after an interrupt but leaving."""
    code = main()
    if code == INTERRUPTED:
        # CPython kills its own process with SIGINT at exit if a KeyboardInterrupt ever escaped code
        # it ran through its embedding API, even when our handler caught it further up; wound down
        # already, the program leaves now with 130, whatever the interrupt went through.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
