"""What the ledger-reading client commands share: which ledger (file or Redis job), its base model, a replay bar."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from swarmtune.cli import CommandError, source_required

if TYPE_CHECKING:
    from swarmtune.entries import Genesis, StoredEntry
    from swarmtune.replay import OnIteration, Replica


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=source_required())
    where.add_argument("--ledger", type=Path, help="ledger file (from `swarmtune ledger export`)")
    where.add_argument("--redis-url", help="Redis holding the ledger: redis://[user:password@]host:port/db, rediss://..., unix:///path (default: $SWARMTUNE_REDIS_URL)")
    parser.add_argument("--job", help="job id in --redis-url (may be left out when the database holds one job)")


def read_stored(args: argparse.Namespace) -> list[bytes]:
    """The stored entries of the ledger the options name."""
    from swarmtune.client.source import LedgerSource, SourceError
    from swarmtune.client.source import read_stored as read

    if args.job and not args.redis_url:
        raise CommandError("--job selects a job in --redis-url; a ledger file holds one job")
    source = LedgerSource(args.ledger, args.redis_url, args.job)
    try:
        stored = read(source)
    except SourceError as exc:
        raise CommandError(str(exc)) from None
    if not stored:
        raise CommandError(f"{source.describe()} holds no entries; point at the ledger of a started job")
    return stored


def read_verified(args: argparse.Namespace) -> list[StoredEntry]:
    """The ledger's entries, parsed while its chain is verified (CommandError at the first bad one)."""
    from swarmtune import ledger

    try:
        return [entry for _, entry in ledger.walk(read_stored(args))]
    except ledger.LedgerError as exc:
        raise CommandError(f"the ledger does not verify: {exc}; run `swarmtune audit` for a full report") from None


def base_model_dir(model: str | None, genesis: Genesis) -> Path:
    """`--model`, or else the model the job spec in genesis names, as a local directory."""
    from swarmtune.jobspec import JobSpecError
    from swarmtune.models import ModelResolutionError, resolve_model
    from swarmtune.replay import genesis_spec

    try:
        return resolve_model(model or genesis_spec(genesis).model)
    except (ModelResolutionError, JobSpecError) as exc:
        raise CommandError(f"cannot find the job's base model: {exc}") from None


@contextmanager
def replay_bar(enabled: bool = True) -> Iterator[OnIteration]:
    """A progress bar on stderr (when it is a terminal) fed by replay's per-iteration callback."""
    from tqdm import tqdm

    with tqdm(desc="replay", unit="it", file=sys.stderr, disable=not enabled or not sys.stderr.isatty()) as bar:

        def on_iteration(replica: Replica, target: int) -> None:
            bar.total = target
            bar.update(replica.iteration - bar.n)

        yield on_iteration
