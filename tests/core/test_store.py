"""The Redis store against a real (embedded) server: compare-and-append, races, durability, errors."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import entries, identity, ledger, store
from swarmtune.embedded_redis import EmbeddedRedis, open_store
from swarmtune.entries import Admission
from swarmtune.store import AppendStatus, StoreUnavailable
from tests.support.cli_runner import run_cli
from tests.support.ledger_factory import ChainBuilder, sound_chain


def _admission(coordinator: Ed25519PrivateKey, head: store.Head, job_id: str, tag: str) -> bytes:
    """A valid next entry on `head`: admitting a fresh key (distinct bytes per writer)."""
    body = Admission(identity.public_key_bytes(identity.generate_key()), tag, "op")
    return entries.seal(coordinator, entries.Entry(head.index + 1, head.hash, job_id, 0, body))


def test_append_statuses_and_head(redis_url: str, job_id: str) -> None:
    chain = sound_chain(job_id=job_id)
    with store.connect(redis_url) as db:
        assert db.head(job_id) is None
        assert db.append(chain.stored[1]).status is AppendStatus.GAP
        for i, stored in enumerate(chain.stored):
            result = db.append(stored)
            assert result.status is AppendStatus.APPENDED and result.ok
            assert result.head == store.Head(i, entries.entry_hash(stored))
        assert db.append(chain.stored[3]).status is AppendStatus.DUPLICATE  # retry of an old one
        last = db.append(chain.stored[-1])
        assert last.status is AppendStatus.DUPLICATE and last.ok
        assert db.head(job_id) == last.head
        # Another writer's entry for a slot that is already taken.
        rival = ChainBuilder(job_id)
        rival.coordinator = chain.coordinator
        rival.stored = list(chain.stored[:2])
        rival.add(Admission(chain.key(0), "rival", "op"))
        assert db.append(rival.stored[2]).status is AppendStatus.TAKEN
        # The next slot, but built on an old head: a fork attempt.
        stale = _admission(chain.coordinator, store.Head(len(chain.stored) - 1, bytes(32)), job_id, "stale")
        refused = db.append(stale)
        assert refused.status is AppendStatus.STALE and not refused.ok
        assert list(db.read(job_id)) == chain.stored
        assert ledger.verify_chain(db.read(job_id)).ok


def test_range_reads_cross_batches(redis_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "READ_BATCH", 3)
    chain = sound_chain(job_id=job_id)
    with store.connect(redis_url) as db:
        for stored in chain.stored:
            db.append(stored)
        assert list(db.read(job_id)) == chain.stored
        assert list(db.read(job_id, 2, 6)) == chain.stored[2:7]
        assert list(db.read(job_id, 5)) == chain.stored[5:]
        assert list(db.read("job-nothing-here")) == []


def test_racing_writers_never_fork_a_job(redis_url: str, job_id: str) -> None:
    """Writers attempt every slot at the same moment: exactly one wins each slot."""
    writers, slots = 4, 12
    chain = ChainBuilder(job_id)
    coordinator, genesis = chain.coordinator, chain.stored[0]
    outcomes: list[tuple[int, AppendStatus]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(writers)
    with store.connect(redis_url) as db:
        assert db.append(genesis).status is AppendStatus.APPENDED

    def writer(tag: int) -> None:
        with store.connect(redis_url) as own:
            for _ in range(slots):
                barrier.wait()
                head = own.head(job_id)
                assert head is not None
                barrier.wait()  # everyone has read the same head; now race for the next slot
                result = own.append(_admission(coordinator, head, job_id, f"writer {tag}"))
                with lock:
                    outcomes.append((head.index + 1, result.status))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot in range(1, slots + 1):
        statuses = sorted(status.value for index, status in outcomes if index == slot)
        assert statuses == ["appended"] + ["taken"] * (writers - 1), (slot, statuses)
    with store.connect(redis_url) as db:
        report = ledger.verify_chain(db.read(job_id))
    assert report.ok and report.entries == slots + 1


def _process_writer(url: str, job_id: str, key_pem: bytes, wins: int, tag: int, barrier: Any) -> None:
    """Keep appending on the latest head until `wins` entries are ours."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    coordinator = load_pem_private_key(key_pem, None)
    assert isinstance(coordinator, Ed25519PrivateKey)
    with store.connect(url) as db:
        barrier.wait()  # start together, so the writers really contend
        while wins:
            head = db.head(job_id)
            assert head is not None
            if db.append(_admission(coordinator, head, job_id, f"process {tag}")).status is AppendStatus.APPENDED:
                wins -= 1


def test_racing_processes_each_get_their_entries_in_one_chain(redis_url: str, job_id: str) -> None:
    processes, wins = 3, 25
    chain = ChainBuilder(job_id)
    with store.connect(redis_url) as db:
        db.append(chain.stored[0])
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no threads inherited from other tests
    barrier = context.Barrier(processes)
    pem = identity.private_key_pem(chain.coordinator)
    writers = [
        context.Process(target=_process_writer, args=(redis_url, job_id, pem, wins, n, barrier)) for n in range(processes)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0] * processes
    with store.connect(redis_url) as db:
        stored = list(db.read(job_id))
    report = ledger.verify_chain(stored)
    assert report.ok and report.entries == 1 + processes * wins
    reasons = [entries.parse_entry(s).entry.body.reason for s in stored[1:]]  # type: ignore[union-attr]
    assert sorted(reasons) == sorted(f"process {n}" for n in range(processes) for _ in range(wins))


def test_open_iteration_state_is_kept_and_closed_with_the_append(redis_url: str, job_id: str) -> None:
    chain = ChainBuilder(job_id)
    chain.add(chain.iteration())
    with store.connect(redis_url) as db:
        assert db.get_open(job_id) == {}
        db.append(chain.stored[0])
        db.put_open(job_id, {"iteration": b"1", "result:0": b"\x00\x01"})
        db.put_open(job_id, {"result:1": b"\x02"})
        assert db.get_open(job_id) == {b"iteration": b"1", b"result:0": b"\x00\x01", b"result:1": b"\x02"}
        assert db.append(chain.stored[1], close_open=True).status is AppendStatus.APPENDED
        assert db.get_open(job_id) == {}
        db.put_open(job_id, {"iteration": b"2"})
        assert db.append(chain.stored[1], close_open=True).status is AppendStatus.DUPLICATE
        assert db.get_open(job_id) == {b"iteration": b"2"}  # a retried close leaves the next iteration alone
        db.delete_open(job_id)
        assert db.get_open(job_id) == {}


def test_jobs_are_listed_and_the_only_job_is_found(tmp_path: Path) -> None:
    with open_store(None, tmp_path / "db") as db:
        with pytest.raises(store.StoreError, match="holds 0 jobs"):
            db.only_job()
        db.append(ChainBuilder("job-b").stored[0])
        assert db.only_job() == "job-b"
        db.append(ChainBuilder("job-a").stored[0])
        assert db.jobs() == ["job-a", "job-b"]
        with pytest.raises(store.StoreError, match=r"holds 2 jobs \(job-a, job-b\); name one with --job"):
            db.only_job()


def test_acknowledged_entries_survive_sigkill_of_the_server(tmp_path: Path) -> None:
    chain = sound_chain(iterations=6, job_id="job-durable")
    server = EmbeddedRedis(tmp_path / "data")
    server.start()
    with store.connect(server.url) as db:
        for stored in chain.stored:
            assert db.append(stored).ok  # acknowledged: fsynced before the reply
    os.kill(server.pid, signal.SIGKILL)  # type: ignore[arg-type]
    server.stop()
    with EmbeddedRedis(tmp_path / "data") as restarted, store.connect(restarted.url) as db:
        recovered = list(db.read("job-durable"))
        assert recovered == chain.stored
        assert ledger.verify_chain(recovered).ok
        assert db.head("job-durable") == store.Head(len(chain.stored) - 1, entries.entry_hash(chain.stored[-1]))


def test_one_data_dir_never_gets_two_servers(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "data"):
        with pytest.raises(StoreUnavailable, match="in use by another embedded Redis"):
            EmbeddedRedis(tmp_path / "data").start()


def test_deep_data_dir_gets_a_short_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep) as server, store.connect(server.url) as db:
        assert len(server.url) < 108 and db.head("job-x") is None
        socket_dir = Path(server.url.removeprefix("unix://")).parent
    assert not socket_dir.exists()


@pytest.mark.parametrize("url", ["unix:///nonexistent/swarmtune.sock", "redis://127.0.0.1:1/0"])
def test_unreachable_redis_says_what_to_check(url: str) -> None:
    with pytest.raises(StoreUnavailable, match="check that the server is running"):
        store.connect(url, timeout_s=1.0)


def test_redis_dying_under_us_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data")
    server.start()
    db = store.connect(server.url)
    os.kill(server.pid, signal.SIGKILL)  # type: ignore[arg-type]
    server.stop()
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        db.head("job-x")


def test_not_a_redis_url_is_refused() -> None:
    with pytest.raises(StoreUnavailable, match="not a Redis URL"):
        store.connect("http://localhost:6379")


def test_password_and_acl_user_in_the_url(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "data") as server:
        socket = server.url.removeprefix("unix://")
        with store.connect(server.url) as db:
            db._client.execute_command("ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "+@all")
            db._client.execute_command("CONFIG", "SET", "requirepass", "topsecret")
        with pytest.raises(StoreUnavailable, match="needs credentials"):
            store.connect(server.url)
        with pytest.raises(StoreUnavailable, match="refused our credentials") as refused:
            store.connect(f"unix://alice:wrong@{socket}")
        assert "wrong" not in str(refused.value)  # the password is redacted
        with store.connect(f"unix://alice:s3cret@{socket}") as db:
            assert db.head("job-x") is None
        with store.connect(f"unix://:topsecret@{socket}") as db:
            assert db.head("job-x") is None


def test_cli_on_a_dead_redis_exits_2_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = "unix:///nonexistent.sock"
    code = run_cli(monkeypatch, "ledger", "export", "--redis-url", dead, "--out", str(tmp_path / "x"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach Redis" in err and "Traceback" not in err


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="give a writable --data-dir"):
        EmbeddedRedis(blocker / "data").start()
