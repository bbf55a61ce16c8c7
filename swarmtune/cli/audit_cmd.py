"""`swarmtune audit`: verify a ledger end to end (and replay it exactly); exit 0 only when all of it holds."""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import TYPE_CHECKING

from swarmtune.cli import CommandError
from swarmtune.cli.client_common import add_source_arguments, base_model_dir, read_stored, replay_bar

if TYPE_CHECKING:
    from swarmtune.entries import Genesis
    from swarmtune.replay import Replica


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--replay", action="store_true", help="also replay from the base model, checking every attested and checkpointed hash")
    parser.add_argument("--model", help="base model directory for --replay (default: the model the job spec names)")
    parser.add_argument("--coordinator-key", help="expected coordinator public key (64 hex digits); default: the key genesis names")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the human report")


def _coordinator_key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CommandError("--coordinator-key must be 64 hex digits (as printed by `swarmtune keygen --json`)") from None


def _base_replica(model: str | None, genesis: Genesis) -> Replica:
    """The replica at iteration 0, read tensor by tensor from the base model's safetensors files (others are loaded)."""
    from swarmtune.replay import replica_from_files

    try:
        return replica_from_files(base_model_dir(model, genesis), genesis)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the base model: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from swarmtune.client.audit import audit
    from swarmtune.replay import ReplayError

    if args.model and not args.replay:
        raise CommandError("--model is the base model to replay from: add --replay")
    key = _coordinator_key(args.coordinator_key)
    stored = read_stored(args)
    # Read once the audit has verified genesis: without a sound genesis there is nothing to replay.
    model = partial(_base_replica, args.model) if args.replay else None
    with replay_bar(args.replay) as on_iteration:
        try:
            report = audit(stored, model, on_iteration, key)
        except ReplayError as exc:
            raise CommandError(str(exc)) from None
    print(json.dumps(report.to_json()) if args.json else report.describe())
    return 0 if report.ok else 1
