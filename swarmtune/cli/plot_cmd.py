"""`swarmtune plot`: a PNG of a job's reward and retention curves over iterations, from its ledger."""

from __future__ import annotations

import argparse
from pathlib import Path

from swarmtune.cli import CommandError
from swarmtune.cli.client_common import add_source_arguments, read_verified


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")


def run(args: argparse.Namespace) -> int:
    from swarmtune.client.plot import plot_spec, save_png
    from swarmtune.jobspec import JobSpecError

    if args.out.suffix.lower() != ".png":
        raise CommandError(f"--out {args.out}: the plot is a PNG; name the file *.png")
    try:
        spec = plot_spec(read_verified(args))
    except JobSpecError as exc:
        raise CommandError(f"the job spec in genesis does not parse: {exc}") from None
    try:
        save_png(spec, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror}") from None
    print(f"plotted {len(spec.points)} iterations of job {spec.job_id} to {args.out}")
    return 0
