"""`swarmtune replay`: rebuild a job's model state from its base model and ledger file; print its hash."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swarmtune.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ledger", type=Path, required=True, help="ledger file (from `swarmtune ledger export`)")
    parser.add_argument("--model", help="base model directory (default: the model the job spec names)")
    parser.add_argument("--until", type=int, help="stop after this iteration (default: the last one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the bare hash")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from swarmtune import ledger, ledgerfile
    from swarmtune.jobspec import JobSpecError
    from swarmtune.models import ModelResolutionError, load_model, resolve_model
    from swarmtune.replay import ReplayError, genesis_spec, replay, verified_entries

    try:
        verified = list(verified_entries(ledgerfile.read(args.ledger)))
    except ledgerfile.LedgerFileError as exc:
        raise CommandError(f"{args.ledger}: {exc}; export the ledger again") from None
    except ledger.LedgerError as exc:
        raise CommandError(f"{args.ledger} does not verify: {exc}; run `swarmtune ledger verify` for a report") from None
    if not verified:
        raise CommandError(f"{args.ledger} holds no entries; export the ledger of a started job")
    try:
        model, _ = load_model(resolve_model(args.model or genesis_spec(verified[0].entry.body).model))
    except (ModelResolutionError, JobSpecError, OSError) as exc:
        raise CommandError(f"cannot load the base model: {exc}") from None
    with tqdm(desc="replay", unit="it", file=sys.stderr, disable=args.json or not sys.stderr.isatty()) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = replay(model, verified, args.until, progress)
        except ReplayError as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        summary = {
            "job_id": verified[0].entry.job_id,
            "iteration": result.iteration,
            "entries": result.entries,
            "head_hash": result.head_hash.hex(),
            "state_hash": result.state_hash.hex(),
        }
        print(json.dumps(summary))
    else:
        print(result.state_hash.hex())
    return 0
