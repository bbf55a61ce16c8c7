"""`swarmtune snapshot`: write the master state at a checkpointed iteration, replayed from the ledger, for late joiners."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from swarmtune.cli import CommandError
from swarmtune.cli.client_common import add_source_arguments, base_model_dir, read_verified, replay_bar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--model", help="the job's base model directory (default: the model the job spec names)")
    parser.add_argument("--iteration", type=int, required=True, help="a checkpointed iteration (the ledger has a checkpoint entry for it)")
    parser.add_argument("--out", type=Path, required=True, help="snapshot file to write (replaced if it exists)")
    parser.add_argument("--json", action="store_true", help="print one JSON object describing the snapshot")


def run(args: argparse.Namespace) -> int:
    from swarmtune.entries import Checkpoint, Genesis
    from swarmtune.replay import ReplayError, replay_replica, replica_from_files
    from swarmtune.snapshot import SnapshotHeader, checkpoints_in, write_snapshot

    verified = read_verified(args)
    genesis = verified[0].entry.body
    assert isinstance(genesis, Genesis)  # read_verified walked the chain: it starts with its genesis
    checkpoints = checkpoints_in(verified)
    if args.iteration not in checkpoints:
        raise CommandError(
            f"iteration {args.iteration} has no checkpoint entry; checkpointed iterations: {sorted(checkpoints) or 'none'} "
            "(the job spec's [schedule] checkpoint_every sets them)"
        )
    entry = checkpoints[args.iteration]
    checkpoint = entry.entry.body
    assert isinstance(checkpoint, Checkpoint)  # checkpoints_in keeps only those
    try:
        replica = replica_from_files(base_model_dir(args.model, genesis), genesis)
        with replay_bar() as on_iteration:
            replayed = replay_replica(replica, verified, args.iteration, on_iteration)
    except ReplayError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot read the base model: {exc}") from None
    header = SnapshotHeader(entry.entry.job_id, args.iteration, entry.hash)
    partial = args.out.with_name(args.out.name + ".partial")
    try:
        with open(partial, "wb") as out:
            state_hash = write_snapshot(out, header, replayed.replica.state)
        if state_hash != checkpoint.state_hash:
            partial.unlink()
            raise CommandError(
                f"replay gives state hash {state_hash.hex()} at iteration {args.iteration}, the checkpoint records "
                f"{checkpoint.state_hash.hex()}: run `swarmtune audit --replay` on this ledger"
            )
        os.replace(partial, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from None
    written = {
        "path": str(args.out),
        "job_id": header.job_id,
        "iteration": header.iteration,
        "checkpoint_hash": header.checkpoint_hash.hex(),
        "state_hash": state_hash.hex(),
        "bytes": args.out.stat().st_size,
    }
    print(json.dumps(written) if args.json else f"wrote the snapshot of job {header.job_id} at iteration {header.iteration} to {args.out}")
    return 0
