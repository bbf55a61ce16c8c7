"""`swarmtune export`: a Hugging Face model directory of a job at any iteration, replayed from its ledger."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swarmtune.cli import CommandError
from swarmtune.cli.client_common import add_source_arguments, base_model_dir, read_verified, replay_bar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--model", help="the job's base model directory (default: the model the job spec names)")
    parser.add_argument("--iteration", type=int, help="export the model after this iteration (default: the last one)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (new or empty)")
    parser.add_argument("--json", action="store_true", help="print one JSON object describing the export")


def run(args: argparse.Namespace) -> int:
    from swarmtune.client.export import ExportError, export_model
    from swarmtune.replay import ReplayError

    verified = read_verified(args)
    model_dir = base_model_dir(args.model, verified[0].entry.body)  # type: ignore[arg-type]
    with replay_bar() as on_iteration:
        try:
            exported = export_model(model_dir, verified, args.out, args.iteration, on_iteration)
        except (ExportError, ReplayError) as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            raise CommandError(f"export failed ({exc}); check the base model directory and that --out is writable") from None
    if args.json:
        print(json.dumps(exported.to_json()))
    else:
        where = f"{exported.directory} ({exported.dtype}, state hash {exported.state_hash.hex()})"
        print(f"exported job {exported.job_id} at iteration {exported.iteration} to {where}")
    return 0
