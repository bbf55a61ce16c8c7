"""`swarmtune ledger export|import|verify|repair-head`: the portable ledger file, its audit, and the head record's repair."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from swarmtune.cli import CommandError

if TYPE_CHECKING:
    from swarmtune.ledger import Report


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        help="redis://[user:password@]host:port/db, rediss://... (TLS) or unix:///path; "
        "default: $SWARMTUNE_REDIS_URL, else the embedded server on --data-dir",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="embedded server data directory (default ~/.local/share/swarmtune/redis)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    export = sub.add_parser("export", help="write a job's ledger from Redis to a file")
    _add_store_arguments(export)
    export.add_argument("--job", help="job id (may be left out when the database holds exactly one job)")
    export.add_argument("--out", type=Path, required=True, help="ledger file to write")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    imports = sub.add_parser("import", help="verify a ledger file and append its entries to Redis")
    _add_store_arguments(imports)
    imports.add_argument("file", type=Path, help="ledger file to import")
    verify = sub.add_parser("verify", help="check a ledger file: chain, signatures, admissions, bindings")
    verify.add_argument("file", type=Path, help="ledger file to verify")
    verify.add_argument("--coordinator-key", help="expected coordinator public key (64 hex digits)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    repair = sub.add_parser(
        "repair-head",
        help="rebuild a job's head record in Redis from its stream, once the whole stream verifies (stop its coordinator first)",
    )
    _add_store_arguments(repair)
    repair.add_argument("--job", help="job id (may be left out when the database holds exactly one job)")
    repair.add_argument("--coordinator-key", help="expected coordinator public key (64 hex digits); default: the key genesis names")


def _export(args: argparse.Namespace) -> int:
    from swarmtune import ledgerfile
    from swarmtune.embedded_redis import open_store
    from swarmtune.entries import entry_hash
    from swarmtune.store import redact

    if args.out.exists() and not args.force:
        raise CommandError(f"{args.out} exists; pass --force to overwrite it")
    with open_store(args.redis_url, args.data_dir) as store:
        job = args.job or store.only_job()
        # To the stream's end: a head record that disagrees with it fails the export (HeadMismatch).
        stored = list(store.read_to_end(job))
        if not stored:
            jobs = ", ".join(store.jobs()) or "none"
            raise CommandError(f"job {job!r} has no ledger in {redact(store.url)}; the jobs there: {jobs}")
    try:
        count = ledgerfile.write(args.out, stored)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror}; check that its directory exists") from None
    print(f"exported {count} entries of job {job} to {args.out} (head {entry_hash(stored[-1]).hex()})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from swarmtune import ledger, ledgerfile
    from swarmtune.embedded_redis import open_store
    from swarmtune.store import AppendStatus, redact

    try:
        stored_entries = ledgerfile.read(args.file)
    except ledgerfile.LedgerFileError as exc:
        raise CommandError(f"{args.file}: {exc}; export the ledger again") from None
    report = ledger.verify_chain(stored_entries)
    if report.problem:
        raise CommandError(f"{args.file} does not verify, nothing imported: {report.problem.describe()}")
    added = 0
    with open_store(args.redis_url, args.data_dir) as store:
        for index, stored in enumerate(stored_entries):
            result = store.append(stored)
            if not result.ok:
                raise CommandError(
                    f"entry {index}: {redact(store.url)} already holds a different ledger for job {report.job_id} "
                    f"({result.status.value}); import into another database or job"
                )
            added += result.status is AppendStatus.APPENDED
    print(f"imported job {report.job_id}: {added} new entries, {len(stored_entries) - added} already present")
    return 0


def _repair_head(args: argparse.Namespace) -> int:
    """Set the head record to the stream's last entry, but only for a stream that verifies entirely."""
    from swarmtune import ledger
    from swarmtune.embedded_redis import open_store
    from swarmtune.entries import entry_hash
    from swarmtune.headcheck import Head, restore_advice
    from swarmtune.store import HeadMismatch, redact

    key = _coordinator_key(args.coordinator_key)
    with open_store(args.redis_url, args.data_dir) as store:
        job = args.job or store.only_job()
        try:
            stored = list(store.read_to_end(job, check_head=False))  # the stream ids are still checked
        except HeadMismatch as exc:
            raise CommandError(f"head not repaired: {exc}") from None
        try:
            before: Head | str | None = store.head(job)
        except HeadMismatch:
            before = "unreadable"
        if not stored:
            raise CommandError(f"job {job!r} has no stream in {redact(store.url)}: nothing to rebuild a head from; {restore_advice(job)}")
        report = ledger.verify_chain(stored, key)
        if report.problem:
            raise CommandError(
                f"head not repaired: the stream of job {job} does not verify ({report.problem.describe()}), so it cannot "
                f"vouch for a head; {restore_advice(job)}"
            )
        head = Head(len(stored) - 1, entry_hash(stored[-1]))
        now = f"entry {head.index} (hash {head.hash.hex()})"
        if before == head:
            print(f"the head record of job {job} already names the stream's last entry, {now}: nothing to repair")
            return 0
        if not store.repair_head(job, head.index, head.hash):
            raise CommandError(f"the stream of job {job} grew while it was verified: stop every coordinator of the job, then run this again")
    was = before if isinstance(before, str) else "missing" if before is None else f"entry {before.index} (hash {before.hash.hex()[:16]})"
    print(f"repaired the head record of job {job}: was {was}, now {now}, the last of {len(stored)} verified entries")
    return 0


def _coordinator_key(text: str | None) -> bytes | None:
    try:
        return None if text is None else bytes.fromhex(text)
    except ValueError:
        raise CommandError("--coordinator-key must be hex (as printed by `swarmtune keygen`)") from None


def _verify(args: argparse.Namespace) -> int:
    from swarmtune import ledgerfile

    key = _coordinator_key(args.coordinator_key)
    try:
        report = ledgerfile.verify_file(args.file, key)
    except ledgerfile.LedgerFileError as exc:
        raise CommandError(f"{exc}; give the path of an exported ledger") from None
    print(json.dumps(report.to_json()) if args.json else _describe(report))
    return 0 if report.ok else 1


def _describe(report: Report) -> str:
    if report.problem:
        return f"ledger BAD after {report.entries} sound entries: {report.problem.describe()}"
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(report.kinds.items()))
    head = report.head_hash.hex() if report.head_hash else "-"
    return (
        f"ledger OK: job {report.job_id}, {report.entries} entries ({kinds}), "
        f"{report.worker_signatures} worker signatures, head {head}"
    )


def run(args: argparse.Namespace) -> int:
    from swarmtune.store import StoreError

    action = {"export": _export, "import": _import, "verify": _verify, "repair-head": _repair_head}[args.ledger_command]
    try:
        return action(args)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
