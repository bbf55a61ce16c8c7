"""What a coordinator reads back from Redis is checked: the open iteration's items as fresh submissions,
the head record against the stream; and the operator's repair of a head record."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import batches, entries, identity
from swarmtune.coordinator import lifecycle
from swarmtune.coordinator.chain import Chain, ChainConflict, History, recover
from swarmtune.coordinator.resume import resume
from swarmtune.coordinator.server import ServerError, open_history
from swarmtune.entries import RetentionReport, Revocation
from swarmtune.jobspec import JobSpec, parse_job_spec
from swarmtune.store import HEAD_KEY, LEDGER_KEY, HeadMismatch, LedgerStore, connect
from tests.support.cli_runner import run_cli
from tests.support.coordinator_harness import WAIT_S, spec_text, with_workers, write_genesis
from tests.support.ledger_factory import sound_chain

REWARDS = (0.0, 1.0)


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


@dataclass
class Stored:
    """A job whose genesis admits workers 0-2, with worker 2 then revoked, and iteration 1 open."""

    spec: JobSpec
    key: Ed25519PrivateKey
    workers: list[Ed25519PrivateKey]
    history: History
    opened: lifecycle.OpenIteration

    def batch(
        self, worker: Ed25519PrivateKey, members: list[int], signer: Ed25519PrivateKey | None = None, reward: float = 0.5, head_hash: bytes | None = None
    ) -> bytes:
        """Worker `worker`'s batch of `members` (each at `reward`), signed by `signer` (default: the worker itself)."""
        head = self.opened.head_hash if head_hash is None else head_hash
        packed = batches.pack_members(members), batches.pack_rewards([reward] * len(members))
        payload = batches.payload(self.spec.job_id, 1, head, identity.public_key_bytes(worker), *packed)
        signature = identity.sign(signer or worker, identity.CONTEXT_BATCH, payload)
        return batches.encode_batch(batches.parts(self.spec.job_id, 1, head, identity.public_key_bytes(worker), *packed, signature))

    def report(self, worker: Ed25519PrivateKey) -> bytes:
        record = RetentionReport(self.spec.job_id, 1, self.opened.head_hash, identity.public_key_bytes(worker), (("probe", 0.9),))
        return entries.encode_signed(entries.sign_record(worker, record))

    def meta(self, **changes: object) -> bytes:
        record = json.loads(lifecycle.encode_open_meta(self.opened))
        return json.dumps({**record, **changes}).encode()


def batch_field(data: bytes) -> bytes:
    """PROTOCOL §6.8's field name, written out here rather than taken from the coordinator."""
    return b"b" + batches.decode_batch(data).signature


def retention_field(worker: Ed25519PrivateKey) -> bytes:
    return b"t" + identity.public_key_bytes(worker)


def stored_job(store: LedgerStore, job_id: str, retention_every: int = 0) -> Stored:
    retention = {"task": "countdown", "every": retention_every} if retention_every else None
    spec = parse_job_spec(spec_text(job_id, retention=retention))
    key, workers = identity.generate_key(), [identity.generate_key() for _ in range(3)]
    write_genesis(store, spec.spec_bytes, job_id, key, tuple(identity.public_key_bytes(w) for w in workers))
    history = recover(store.read(job_id), identity.public_key_bytes(key), 0.0)
    Chain(store, key, history).append(Revocation(identity.public_key_bytes(workers[2]), "test", ""))
    return Stored(spec, key, workers, history, lifecycle.open_iteration(spec, 1, history.head.hash, 1000))


def dropped(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """worker fingerprint/item -> reason of every logged drop."""
    events = [r for r in caplog.records if r.getMessage() == "dropped a stored item of the open iteration"]
    return {f"{r.worker}/{r.item}": r.reason for r in events}  # type: ignore[attr-defined]


def test_resume_takes_only_what_a_fresh_submission_would_pass(store: LedgerStore, job_id: str, caplog: pytest.LogCaptureFixture) -> None:
    job = stored_job(store, job_id)
    honest, other, revoked = job.workers
    stranger = identity.generate_key()
    good = job.batch(honest, [0, 1, 9])  # member 9 is not in the population of 6: dropped alone
    moved = job.batch(other, [5])
    stored = [
        good,
        # The failure of issue 14: an honest key's batch with a bad signature...
        job.batch(honest, [2], signer=stranger, reward=0.999),
        # ...and a valid-looking batch from a key the ledger never admitted.
        job.batch(stranger, [2], reward=0.999),
        job.batch(revoked, [3]),
        job.batch(other, [2], head_hash=bytes(32)),
        job.batch(other, [3], reward=7.0),
    ]
    fields = {
        b"meta": job.meta(),
        **{batch_field(data): data for data in stored},
        # Under another batch's field. Not `[:-1] + b"\x00"`: an Ed25519 signature's last byte is 0 one time
        # in 16 (S < 2^253), and that name would overwrite the good batch's own field.
        batch_field(good)[:-1] + bytes([batch_field(good)[-1] ^ 0xFF]): moved,
        retention_field(other): job.report(other),  # retention is not due in this job
        b"junk": b"\x00",
    }
    with caplog.at_level(logging.WARNING, "swarmtune.coordinator"):
        current = resume(job.spec, fields, job.history, REWARDS, 2000)
    assert current is not None and current.open.iteration == 1
    assert current.result_count() == 2 and current.held_rewards(identity.public_key_bytes(honest)) == {0: 0.5, 1: 0.5}
    assert current.pending(identity.public_key_bytes(honest)) == [] and not current.retention
    name = lambda worker: identity.fingerprint(identity.public_key_bytes(worker))  # noqa: E731
    events = [r for r in caplog.records if r.getMessage() == "dropped a stored item of the open iteration"]
    assert sorted((r.worker, r.item, r.reason) for r in events) == sorted([  # type: ignore[attr-defined]
        (name(honest), "result", "NOT_ASSIGNED"),
        (name(honest), "result batch", "BAD_SIGNATURE"),
        (name(stranger), "result batch", "UNKNOWN_KEY"),
        (name(revoked), "result batch", "REVOKED_KEY"),
        (name(other), "result batch", "WRONG_HEAD"),
        (name(other), "result", "REWARD_OUT_OF_RANGE"),
        (name(other), "result batch", "MALFORMED"),
        (name(other), "retention report", "RETENTION_NOT_REQUESTED"),
        ("-", "field", "MALFORMED"),
    ])  # fmt: skip


def test_resume_takes_one_retention_report_where_it_is_due(store: LedgerStore, job_id: str, caplog: pytest.LogCaptureFixture) -> None:
    job = stored_job(store, job_id, retention_every=1)
    first, second, _ = job.workers
    fields = {b"meta": job.meta(), retention_field(first): job.report(first), retention_field(second): job.report(second)}
    with caplog.at_level(logging.WARNING, "swarmtune.coordinator"):
        current = resume(job.spec, fields, job.history, REWARDS, 2000)
    assert current is not None and len(current.retention) == 1
    assert current.retention_worker in current.retention
    assert sorted(dropped(caplog).values()) == ["RETENTION_NOT_REQUESTED"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iteration": 2}, "the ledger's last iteration is 0"),
        ({"head_hash": "00" * 32}, "not an entry since the ledger's last iteration"),
        ({"head_hash": "zz"}, "does not parse"),
        ({"opened_ms": None}, "does not parse"),
    ],
)
def test_a_meta_record_the_ledger_does_not_allow_is_not_resumed(
    store: LedgerStore, job_id: str, caplog: pytest.LogCaptureFixture, changes: dict[str, object], reason: str
) -> None:
    job = stored_job(store, job_id)
    data = job.batch(job.workers[0], [0])
    fields = {b"meta": job.meta(**changes), batch_field(data): data}
    with caplog.at_level(logging.WARNING, "swarmtune.coordinator"):
        assert resume(job.spec, fields, job.history, REWARDS, 2000) is None
    (event,) = [r for r in caplog.records if r.getMessage() == "not resuming the stored open iteration"]
    assert reason in event.reason  # type: ignore[attr-defined]


def test_an_iteration_opened_before_an_admission_resumes(store: LedgerStore, job_id: str) -> None:
    job = stored_job(store, job_id)  # the revocation landed after genesis: both heads are open heads
    genesis_hash = entries.entry_hash(next(store.read(job_id, 0, 0)))
    earlier = lifecycle.open_iteration(job.spec, 1, genesis_hash, 1000)
    resumed = resume(job.spec, {b"meta": lifecycle.encode_open_meta(earlier)}, job.history, REWARDS, 2000)
    assert resumed is not None and resumed.open.head_hash == genesis_hash


# ---- the head record against the stream ---------------------------------------------------------


def stored_chain(store: LedgerStore, job_id: str) -> list[bytes]:
    chain = sound_chain(job_id=job_id)
    assert all(store.append(s).ok for s in chain.stored)
    return chain.stored


def test_read_to_end_checks_the_head_record(store: LedgerStore, job_id: str) -> None:
    stored = stored_chain(store, job_id)
    last = len(stored) - 1
    assert list(store.read_to_end(job_id)) == stored
    head = HEAD_KEY.format(job=job_id)
    store._client.hset(head, "index", str(last - 3))
    with pytest.raises(HeadMismatch, match=f"says its last entry is {last - 3}, but its stream's last entry is {last}"):
        list(store.read_to_end(job_id))
    assert list(store.read_to_end(job_id, check_head=False)) == stored
    store._client.hset(head, "index", str(last + 2))
    with pytest.raises(HeadMismatch, match=f"says its last entry is {last + 2}"):
        list(store.read_to_end(job_id))
    store._client.hset(head, mapping={"index": str(last), "hash": bytes(32)})
    with pytest.raises(HeadMismatch, match=f"names entry {last} with hash 0000000000000000, but"):
        list(store.read_to_end(job_id))
    store._client.hset(head, "index", "x")
    with pytest.raises(HeadMismatch, match="unreadable.*repair-head"):
        store.head(job_id)
    store._client.delete(head)
    with pytest.raises(HeadMismatch, match=f"no head record, but its stream holds {last + 1} entries"):
        list(store.read_to_end(job_id))


def test_an_entry_at_a_foreign_stream_id_is_found(store: LedgerStore, job_id: str) -> None:
    stored = stored_chain(store, job_id)
    key = LEDGER_KEY.format(job=job_id)
    store._client.xdel(key, f"{len(stored) - 1}-1")
    store._client.xadd(key, {"e": stored[-1]}, id=f"{len(stored) + 5}-1")  # same bytes, another id
    with pytest.raises(HeadMismatch, match=f"holds id {len(stored) + 5}-1 where entry {len(stored) - 1} belongs.*ledger import"):
        list(store.read_to_end(job_id, check_head=False))


def test_the_coordinator_refuses_to_start_on_a_head_that_disagrees(store: LedgerStore, job_id: str) -> None:
    job = stored_job(store, job_id)
    admitted = tuple(identity.public_key_bytes(w) for w in job.workers)
    store._client.hset(HEAD_KEY.format(job=job_id), "hash", bytes(32))
    with pytest.raises(ServerError, match=f"not starting: the head record of job {job_id} names entry 1 .*ledger repair-head --job {job_id}"):
        open_history(store, job.spec, job.key, admitted, make_genesis=lambda: pytest.fail("no genesis for an existing job"))
    store._client.delete(HEAD_KEY.format(job=job_id))  # a head-less stream is no new job
    with pytest.raises(ServerError, match="no head record, but its stream holds 2 entries"):
        open_history(store, job.spec, job.key, admitted, make_genesis=lambda: pytest.fail("no genesis for an existing job"))
    assert run_cli_ok("ledger", "repair-head", "--redis-url", store.url, "--job", job_id)
    assert open_history(store, job.spec, job.key, admitted, make_genesis=lambda: pytest.fail("no genesis")).head.entry.index == 1


def test_a_head_record_changed_under_a_running_coordinator_stops_its_next_append(store: LedgerStore, job_id: str) -> None:
    job = stored_job(store, job_id)
    chain = Chain(store, job.key, job.history)
    store._client.hset(HEAD_KEY.format(job=job_id), "hash", bytes(32))
    with pytest.raises(ChainConflict, match="found stale: the head record in Redis names entry 1 \\(hash 0000000000000000\\)"):
        chain.append(Revocation(identity.public_key_bytes(job.workers[1]), "test", ""))


def run_cli_ok(*argv: str) -> bool:
    with pytest.MonkeyPatch.context() as patch:
        return run_cli(patch, *argv) == 0


def finished_job(store: LedgerStore, job_id: str) -> int:
    """Run a 4-iteration job with simulated workers in this process; the index of its last entry."""

    async def scenario() -> None:
        async with with_workers(store, spec_text(job_id, iterations=4), 2) as (c, workers):
            await c.begin(*workers)
            await asyncio.wait_for(c.job.finished.wait(), WAIT_S)

    asyncio.run(scenario())
    return len(list(store.read(job_id))) - 1


def test_readers_fail_loudly_on_a_lowered_head_until_it_is_repaired(
    store: LedgerStore, job_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = finished_job(store, job_id)
    store._client.hset(HEAD_KEY.format(job=job_id), "index", str(last - 3))
    out = str(tmp_path / "ledger.bin")
    commands = [
        ("ledger", "export", "--redis-url", store.url, "--job", job_id, "--out", out, "--force"),
        ("audit", "--redis-url", store.url, "--job", job_id),
        ("status", "--redis-url", store.url, "--job", job_id),
    ]
    for argv in commands:
        with pytest.MonkeyPatch.context() as patch:
            assert run_cli(patch, *argv) == 2, argv
        error = capsys.readouterr().err
        assert f"says its last entry is {last - 3}, but its stream's last entry is {last}" in error, (argv, error)
    assert run_cli_ok("ledger", "repair-head", "--redis-url", store.url, "--job", job_id)
    assert f"was entry {last - 3}" in capsys.readouterr().out
    for argv in commands:
        assert run_cli_ok(*argv), argv
    assert run_cli_ok("ledger", "repair-head", "--redis-url", store.url, "--job", job_id)
    assert "nothing to repair" in capsys.readouterr().out


def test_repair_head_refuses_a_stream_that_does_not_verify(store: LedgerStore, job_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    stored = stored_chain(store, job_id)
    key = LEDGER_KEY.format(job=job_id)
    forged = sound_chain(job_id=job_id).stored[-1]  # another coordinator's entry in the last place
    store._client.delete(key)  # a stream never takes an id below its top again: rewrite it whole
    for index, entry in enumerate([*stored[:-1], forged]):
        store._client.xadd(key, {"e": entry}, id=f"{index}-1")
    with pytest.MonkeyPatch.context() as patch:
        assert run_cli(patch, "ledger", "repair-head", "--redis-url", store.url, "--job", job_id) == 2
    error = capsys.readouterr().err
    assert f"the stream of job {job_id} does not verify (entry {len(stored) - 1}" in error and "ledger import" in error
