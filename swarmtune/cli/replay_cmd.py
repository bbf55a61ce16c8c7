"""`swarmtune replay`: rebuild a job's model state from its base model and ledger file; print its hash."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from swarmtune.cli import CommandError
from swarmtune.cli.client_common import replay_bar

if TYPE_CHECKING:
    from swarmtune.replay import Replica


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ledger", type=Path, required=True, help="ledger file (from `swarmtune ledger export`)")
    parser.add_argument("--model", help="base model directory (default: the model the job spec names)")
    parser.add_argument("--until", type=int, help="stop after this iteration (default: the last one)")
    parser.add_argument("--each", action="store_true", help="also print the state hash after every iteration")
    parser.add_argument("--json", action="store_true", help="print JSON objects (one per line) instead of bare hashes")


def _printer(as_json: bool) -> Callable[[dict[str, Any]], None]:
    def emit(fields: dict[str, Any]) -> None:
        print(json.dumps(fields) if as_json else fields["state_hash"], flush=True)

    return emit


def run(args: argparse.Namespace) -> int:
    from swarmtune import ledger, ledgerfile
    from swarmtune.entries import Genesis
    from swarmtune.jobspec import JobSpecError
    from swarmtune.models import ModelResolutionError, resolve_model
    from swarmtune.replay import ReplayError, genesis_spec, replay_replica, replica_from_files

    try:
        verified = [entry for _, entry in ledger.walk(ledgerfile.read(args.ledger))]
    except ledgerfile.LedgerFileError as exc:
        raise CommandError(f"{args.ledger}: {exc}; export the ledger again") from None
    except ledger.LedgerError as exc:
        raise CommandError(f"{args.ledger} does not verify: {exc}; run `swarmtune ledger verify` for a report") from None
    if not verified:
        raise CommandError(f"{args.ledger} holds no entries; export the ledger of a started job")
    genesis = verified[0].entry.body
    if not isinstance(genesis, Genesis):
        raise CommandError(f"{args.ledger} does not start with a genesis entry; export the whole ledger")
    try:
        # Read tensor by tensor from the base model's safetensors files, never loaded whole (others are loaded).
        replica = replica_from_files(resolve_model(args.model or genesis_spec(genesis).model), genesis)
    except (ModelResolutionError, JobSpecError, OSError) as exc:
        raise CommandError(f"cannot read the base model: {exc}") from None
    except ReplayError as exc:
        raise CommandError(str(exc)) from None
    emit = _printer(args.json)
    with replay_bar() as advance_bar:

        def on_iteration(replica: Replica, target: int) -> None:
            advance_bar(replica, target)
            if args.each:
                emit({"iteration": replica.iteration, "state_hash": replica.state_hash().hex()})

        try:
            result = replay_replica(replica, verified, args.until, on_iteration)
        except ReplayError as exc:
            raise CommandError(str(exc)) from None
    emit(
        {
            "job_id": verified[0].entry.job_id,
            "iteration": result.iteration,
            "entries": result.entries,
            "head_hash": result.head_hash.hex(),
            "state_hash": result.state_hash.hex(),
        }
    )
    return 0
