"""`swarmtune ledger export|import|verify`: the portable ledger file and its audit."""

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
        "default: the embedded server on --data-dir",
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


def _export(args: argparse.Namespace) -> int:
    from swarmtune import ledgerfile
    from swarmtune.embedded_redis import open_store
    from swarmtune.store import redact

    if args.out.exists() and not args.force:
        raise CommandError(f"{args.out} exists; pass --force to overwrite it")
    with open_store(args.redis_url, args.data_dir) as store:
        job = args.job or store.only_job()
        head = store.head(job)
        if head is None:
            jobs = ", ".join(store.jobs()) or "none"
            raise CommandError(f"job {job!r} has no ledger in {redact(store.url)}; the jobs there: {jobs}")
        try:
            count = ledgerfile.write(args.out, store.read(job, 0, head.index))
        except OSError as exc:
            raise CommandError(f"cannot write {args.out}: {exc.strerror}; check that its directory exists") from None
    print(f"exported {count} entries of job {job} to {args.out} (head {head.hash.hex()})")
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


def _verify(args: argparse.Namespace) -> int:
    from swarmtune import ledgerfile

    key = None
    if args.coordinator_key:
        try:
            key = bytes.fromhex(args.coordinator_key)
        except ValueError:
            raise CommandError("--coordinator-key must be hex (as printed by `swarmtune keygen`)") from None
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

    action = {"export": _export, "import": _import, "verify": _verify}[args.ledger_command]
    try:
        return action(args)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
