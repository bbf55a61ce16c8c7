"""Reading a ledger from a file or from Redis, and the errors that say what to do instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtune import ledgerfile, store
from swarmtune.client.source import LedgerSource, SourceError, read_stored
from tests.support.ledger_factory import sound_chain


def test_file_and_redis_give_the_same_entries(tmp_path: Path, redis_url: str, job_id: str) -> None:
    chain = sound_chain(job_id=job_id)
    ledgerfile.write(tmp_path / "ledger.bin", chain.stored)
    with store.connect(redis_url) as ledger_store:
        assert all(ledger_store.append(s).ok for s in chain.stored)
    assert read_stored(LedgerSource(path=tmp_path / "ledger.bin")) == chain.stored
    assert read_stored(LedgerSource(redis_url=redis_url, job=job_id)) == chain.stored


def test_a_database_with_several_jobs_needs_a_job(redis_url: str, job_id: str) -> None:
    with store.connect(redis_url) as ledger_store:
        for name in (job_id + "-a", job_id + "-b"):
            assert ledger_store.append(sound_chain(1, job_id=name).stored[0]).ok
    with pytest.raises(SourceError, match="name one with --job"):
        read_stored(LedgerSource(redis_url=redis_url))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (LedgerSource(), "either a ledger file or a Redis URL"),
        (LedgerSource(path=Path("/nonexistent/ledger.bin")), "export the ledger again"),
        (LedgerSource(redis_url="http://localhost"), "use redis://"),
        (LedgerSource(redis_url="unix:///nonexistent.sock"), "check that the server is running"),
    ],
)
def test_bad_sources_say_what_to_do(source: LedgerSource, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        read_stored(source)


def test_an_unknown_job_is_named(redis_url: str, job_id: str) -> None:
    with pytest.raises(SourceError, match=f"job '{job_id}' has no ledger"):
        read_stored(LedgerSource(redis_url=redis_url, job=job_id))
