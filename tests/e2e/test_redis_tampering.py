"""A hostile Redis, with real processes on loopback (issue 14): forged items in the open-iteration
hash never reach the ledger, and a head record that disagrees with the stream stops readers and the
coordinator until `swarmtune ledger repair-head` rebuilds it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import batches, identity
from swarmtune.jobspec import parse_job_spec
from tests.support.cluster import WAIT_S, Cluster, Clusters, iterations, key_of, ledger_entries, spec_text
from tests.support.processes import Proc

pytestmark = pytest.mark.slow

DROPPED = "dropped a stored item of the open iteration"


def keys(job_id: str) -> tuple[str, str, str]:
    """The job's stream, head record and open-iteration hash (PROTOCOL §5.5)."""
    return f"swarmtune:{{{job_id}}}:ledger", f"swarmtune:{{{job_id}}}:head", f"swarmtune:{{{job_id}}}:open"


def paused_iteration(raw: redis.Redis, cluster: Cluster, coordinator: Proc) -> tuple[int, bytes, dict[bytes, bytes]]:
    """The iteration open while the workers are stopped: its number, head, and the stored fields."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        fields = raw.hgetall(keys(cluster.job_id)[2])
        meta = json.loads(fields.get(b"meta", b"{}"))
        opened = coordinator.events("iteration opened")
        if meta and opened and meta["iteration"] == opened[-1]["iteration"]:
            return meta["iteration"], bytes.fromhex(meta["head_hash"]), fields
        time.sleep(0.1)
    pytest.fail(f"no stored open iteration within {WAIT_S}s:\n{coordinator.tail()}")


def batch_field(data: bytes) -> bytes:
    """A batch's field in the open-iteration hash, as PROTOCOL §6.8 writes it."""
    return b"b" + batches.decode_batch(data).signature


def forged_batch(signer: Ed25519PrivateKey, job_id: str, iteration: int, head: bytes, worker_key: bytes, member: int) -> bytes:
    """A batch of one member at reward 0.999 naming `worker_key`, signed by `signer`."""
    packed = batches.pack_members([member]), batches.pack_rewards([0.999])
    signature = identity.sign(signer, identity.CONTEXT_BATCH, batches.payload(job_id, iteration, head, worker_key, *packed))
    return batches.encode_batch(batches.parts(job_id, iteration, head, worker_key, *packed, signature))


def test_forged_open_state_results_are_dropped_on_restart(clusters: Clusters, redis_url: str, model_dir: Path, job_id: str) -> None:
    cluster = clusters("forged", redis_url, spec_text(job_id, model_dir, iterations=5))
    coordinator, workers, _ = cluster.start(2)
    coordinator.wait_for("iteration opened", WAIT_S, lambda e: e["iteration"] >= 3)
    for worker in workers:
        worker.send(signal.SIGSTOP)
    time.sleep(1.0)  # what they sent before the stop lands
    raw = redis.Redis.from_url(redis_url)
    iteration, head, fields = paused_iteration(raw, cluster, coordinator)
    spec = parse_job_spec(cluster.spec.encode())
    stored_batches = [batches.decode_batch(data) for name, data in fields.items() if name.startswith(b"b")]
    honest = key_of(cluster.worker_keys[0])
    held = {m for b in stored_batches if b.worker_key == honest for m in b.members}
    member = next(m for m in range(spec.population) if m not in held)
    stranger = identity.generate_key()  # never admitted
    stranger_key = identity.public_key_bytes(stranger)
    forged_items = [
        # an honest worker's key, a fake reward, and a signature that is not its own
        forged_batch(identity.generate_key(), job_id, iteration, head, honest, member),
        forged_batch(stranger, job_id, iteration, head, stranger_key, 0),
    ]
    forged = {batch_field(data): data for data in forged_items}
    raw.hset(keys(job_id)[2], mapping=forged)
    coordinator.kill()
    restarted = cluster.coordinator("--serve-after", name="restarted")
    resumed = restarted.wait_for("resumed iteration", WAIT_S)
    genuine = len({(b.worker_key, m) for b in stored_batches for m in b.members})
    assert (resumed["iteration"], resumed["results"]) == (iteration, genuine), restarted.tail()
    dropped = {e["worker"]: e["reason"] for e in restarted.events(DROPPED)}
    assert dropped == {identity.fingerprint(honest): "BAD_SIGNATURE", identity.fingerprint(stranger_key): "UNKNOWN_KEY"}
    for worker in workers:
        worker.send(signal.SIGCONT)
    cluster.finish(restarted, workers)
    stored = ledger_entries(cluster.export())
    done = iterations(stored)
    assert [it.iteration for it in done] == [1, 2, 3, 4, 5]
    assert all({r.member for r in it.results} == {m.member for m in it.members} for it in done)
    assert not any(name[1:] in entry.stored for entry in stored for name in forged)  # no forged signature recorded
    assert all(r.worker_key != stranger_key and r.reward != 0.999 for it in done for r in it.results)
    (report,) = cluster.run("audit", "audit", "--redis-url", redis_url, "--job", job_id, "--replay", "--model", str(model_dir), "--json")
    assert report["ok"] and report["replayed"], report


def test_a_head_record_that_disagrees_with_the_stream_is_refused_until_repaired(
    clusters: Clusters, redis_url: str, model_dir: Path, job_id: str
) -> None:
    cluster = clusters("head", redis_url, spec_text(job_id, model_dir, iterations=4))
    coordinator, workers, _ = cluster.start(2)
    coordinator.wait_for("iteration closed", WAIT_S, lambda e: e["iteration"] >= 2)
    coordinator.kill()
    raw = redis.Redis.from_url(redis_url)
    stream, head, _ = keys(job_id)
    last = raw.xlen(stream) - 1
    # A lowered head index: every reader of the stream fails loudly, naming both numbers.
    raw.hset(head, "index", str(last - 2))
    readers = {
        "export-lowered": ["ledger", "export", "--redis-url", redis_url, "--job", job_id, "--out", str(cluster.root / "x.bin")],
        "audit-lowered": ["audit", "--redis-url", redis_url, "--job", job_id],
        "status-lowered": ["status", "--redis-url", redis_url, "--job", job_id],
    }
    for name, argv in readers.items():
        reader = cluster.launch(name, "swarmtune", argv)
        assert reader.wait(WAIT_S) == 2, reader.tail()
        assert f"says its last entry is {last - 2}, but its stream's last entry is {last}" in reader.text(), reader.tail()
    assert not (cluster.root / "x.bin").exists()
    cluster.run("repair-lowered", "ledger", "repair-head", "--redis-url", redis_url, "--job", job_id)
    assert len(ledger_entries(cluster.export())) == last + 1
    # A tampered head hash: the coordinator refuses to start, saying what to do, without a traceback.
    raw.hset(head, "hash", bytes(32))
    refused = cluster.coordinator("--serve-after", name="refused")
    assert refused.wait(WAIT_S) == 2, refused.tail()
    assert "not starting: the head record" in refused.text() and "ledger repair-head" in refused.text(), refused.tail()
    assert "Traceback" not in refused.text() and "CancelledError" not in refused.text(), refused.tail()
    cluster.run("repair-hash", "ledger", "repair-head", "--redis-url", redis_url, "--job", job_id)
    restarted = cluster.coordinator("--serve-after", name="restarted")
    cluster.finish(restarted, workers)
    done = iterations(ledger_entries(cluster.export()))
    assert [it.iteration for it in done] == [1, 2, 3, 4]
    (report,) = cluster.run("audit", "audit", "--redis-url", redis_url, "--job", job_id, "--json")
    assert report["ok"], report
