"""Where a client reads a job's ledger: a ledger file, or the job's stream in a Redis database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from swarmtune import ledgerfile, store


class SourceError(Exception):
    """The ledger cannot be read from where it was asked for; the message says what to do."""


@dataclass(frozen=True)
class LedgerSource:
    """A ledger file (`path`), or a job (`job`; None: the database's only job) at `redis_url`."""

    path: Path | None = None
    redis_url: str | None = None
    job: str | None = None

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"job {self.job or '(the only one)'} at {store.redact(self.redis_url or '')}"


def read_stored(source: LedgerSource) -> list[bytes]:
    """Every stored entry of the ledger, exactly as stored, genesis first."""
    if (source.path is None) == (source.redis_url is None):
        raise SourceError("give either a ledger file or a Redis URL (with its job), not both or neither")
    if source.path is not None:
        return _read_file(source.path)
    return _read_redis(source.redis_url or "", source.job)


def _read_file(path: Path) -> list[bytes]:
    try:
        return ledgerfile.read(path)
    except ledgerfile.LedgerFileError as exc:
        raise SourceError(f"{path}: {exc}; export the ledger again with `swarmtune ledger export`") from None


def _read_redis(url: str, job: str | None) -> list[bytes]:
    try:
        with store.connect(url) as ledger_store:
            job_id = job or ledger_store.only_job()
            # The whole stream, checked against the head record: a head that disagrees is an error,
            # never a shorter ledger that still verifies.
            stored = list(ledger_store.read_to_end(job_id))
            if not stored:
                raise SourceError(f"job {job_id!r} has no ledger at {store.redact(url)}; leave out --job to list its jobs")
            return stored
    except (store.StoreError, ValueError) as exc:
        raise SourceError(str(exc)) from None
