"""Ledger bench: iteration appends on the embedded Redis, and `ledger verify` against raw Ed25519.

Run with no arguments (one to two minutes). Progress goes to stdout; the last line is one JSON object:
  appends_per_s             iteration entries (N=30 signed results each) appended per second on the
                            embedded server (AOF fsync always), counting body building, coordinator
                            signature and compare-and-append (workers' signing is not the coordinator's)
  raw_xadd_per_s            reference: plain XADD of the same bytes on the same server, timed
                            alternately with the appends (so it shares their load and fsyncs)
  append_ms_median          median time of one append
  *_fsync_off               the first two again with the AOF fsync off: the cost of the software alone
  verify_1000_iterations_s  seconds for `ledger verify` (file read, parse, hash, every check) of the
                            exported ledger of 1,000 such iterations, results' signatures checked
                            on every core (`verify_threads`)
  verify_1000_iterations_s_one_thread   reference: the same verification on one thread
  verify_threads_speedup    the one-thread time over the every-core time
  verify_results_per_s      signed results checked per second by ledger verification
  raw_verify_per_s          reference: cryptography's Ed25519 verify of the same messages, keys preloaded
  verify_vs_raw             one thread: median over blocks of 20 entries of (raw time / ledger time), each block
                            timed both ways back to back (goal >= 0.8; the ceiling is 30/31: each
                            entry also carries the coordinator's signature)
  verify_vs_raw_total       the same ratio from the totals (includes decoding the file)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarmtune import batches, entries, identity, ledger, ledgerfile, store
from swarmtune.batches import Batch, Recorded
from swarmtune.embedded_redis import EmbeddedRedis
from swarmtune.entries import Entry, Iteration, NoisePlan

POPULATION = 30
JOB = "bench-ledger"


def _genesis(coordinator: Ed25519PrivateKey, workers: list[Ed25519PrivateKey]) -> bytes:
    genesis = entries.new_genesis(
        b'job_id = "bench-ledger"\npopulation = 30\n',
        bytes(32),
        identity.public_key_bytes(coordinator),
        protocol_version=entries.PROTOCOL_VERSION,
        noise_version="noise/1",
        shaping_version="shaping/1",
        admitted_workers=tuple(identity.public_key_bytes(w) for w in workers),
    )
    return entries.seal(coordinator, entries.first_entry(JOB, genesis, 0))


Submitted = list[Batch]


def _submitted(workers: list[Ed25519PrivateKey], t: int, head: bytes) -> Submitted:
    """What the workers sent for iteration t: member m evaluated by worker m (one batch of one member each)."""
    return [batches.sign_batch(worker, JOB, t, head, [m], [0.01 * m]) for m, worker in enumerate(workers)]


def _iteration(t: int, head: bytes, submitted: Submitted) -> Iteration:
    coefficients = tuple(int(1e6 * b.rewards[0]) for b in submitted)
    return Iteration(t, head, NoisePlan(t, POPULATION, False), tuple(map(Recorded, submitted)), coefficients, (), "zscore")


@dataclass(frozen=True)
class Workload:
    """A job's coordinator, and what its workers submitted for every iteration."""

    coordinator: Ed25519PrivateKey
    genesis: bytes
    submitted: list[Submitted]


def make_workload(iterations: int) -> Workload:
    """Workers' signed results for every iteration, computed up front (Ed25519 is deterministic,
    so the heads the results bind to are the heads the timed appends will produce)."""
    coordinator = identity.generate_key()
    workers = [identity.generate_key() for _ in range(POPULATION)]
    genesis = _genesis(coordinator, workers)
    head, submitted = entries.entry_hash(genesis), []
    for t in range(1, iterations + 1):
        sent = _submitted(workers, t, head)
        submitted.append(sent)
        entry = Entry(t, head, JOB, t, _iteration(t, head, sent))
        head = entries.entry_hash(entries.seal(coordinator, entry))
    return Workload(coordinator, genesis, submitted)


@dataclass(frozen=True)
class Appends:
    per_s: float
    raw_xadd_per_s: float
    median_ms: float


def bench_appends(db: store.LedgerStore, work: Workload) -> Appends:
    """Each iteration is closed back to back: build the entry, seal it, compare-and-append it; right
    after, the reference appends the same bytes with a plain XADD (no script, no checks, no
    signing), so both see the same machine load and the same fsyncs."""
    client = db._client  # the reference deliberately bypasses the store
    head = db.append(work.genesis).head
    ours: list[float] = []
    reference = 0.0
    for t, sent in enumerate(work.submitted, start=1):
        assert head is not None
        start = time.perf_counter()
        body = _iteration(t, head.hash, sent)
        stored = entries.seal(work.coordinator, Entry(head.index + 1, head.hash, JOB, t, body))
        outcome = db.append(stored, close_open=True)
        middle = time.perf_counter()
        client.xadd("bench:raw", {"e": stored})
        ours.append(middle - start)
        reference += time.perf_counter() - middle
        if outcome.status is not store.AppendStatus.APPENDED:
            raise SystemExit(f"bench append {t} was {outcome.status.value}; the bench database is not fresh")
        head = outcome.head
    return Appends(len(ours) / sum(ours), len(ours) / reference, 1000 * statistics.median(ours))


def _raw_verify(jobs: list[tuple[Ed25519PublicKey, bytes, bytes]]) -> float:
    start = time.perf_counter()
    for key, signature, message in jobs:
        key.verify(signature, message)
    return time.perf_counter() - start


def _ledger_verify(state: ledger.ChainState, block: list[bytes]) -> tuple[ledger.ChainState, float]:
    start = time.perf_counter()
    for state, _ in ledger.walk(block, state, threads=1):
        pass
    return state, time.perf_counter() - start


@dataclass(frozen=True)
class Verify:
    results_per_s: float
    raw_per_s: float
    median_block_ratio: float


def bench_verify_ratio(data: bytes, block_size: int = 20) -> Verify:
    """Ledger verification against raw Ed25519 verification of the same signed results, timed in
    alternating blocks of entries so that both see the same machine load. The ledger side's total
    includes decoding the file; the median of the per-block ratios resists bursts of load."""
    start = time.perf_counter()
    ledger_entries = ledgerfile.decode(data)
    state, _ = ledger.start(ledger_entries[0])
    ledger_s, raw_s, results = time.perf_counter() - start, 0.0, 0
    ratios = []
    for first in range(1, len(ledger_entries), block_size):
        block = ledger_entries[first : first + block_size]
        jobs = []
        for stored in block:
            for recorded in cast(Iteration, entries.parse_entry(stored).entry.body).batches:
                message = identity.signed_message(identity.CONTEXT_BATCH, recorded.batch.payload)
                jobs.append((identity.load_public_key(recorded.batch.worker_key), recorded.batch.signature, message))
        raw_seconds = _raw_verify(jobs)
        state, seconds = _ledger_verify(state, block)
        ratios.append(raw_seconds / seconds)
        ledger_s, raw_s, results = ledger_s + seconds, raw_s + raw_seconds, results + len(jobs)
    return Verify(results / ledger_s, results / raw_s, statistics.median(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000)
    args = parser.parse_args()
    work = make_workload(args.iterations)
    with tempfile.TemporaryDirectory(prefix="swarmtune-bench-") as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        with store.connect(server.url) as db:
            synced = bench_appends(db, work)
            print(f"appended {args.iterations} iterations of {POPULATION} results: {synced.per_s:.0f}/s", flush=True)
            print(f"reference: plain XADD of the same entries: {synced.raw_xadd_per_s:.0f}/s", flush=True)
            exported = Path(tmp) / "bench.ledger"
            ledgerfile.write(exported, db.read(JOB))
            # Again without fsync: what the software costs when the disk is not the limit.
            db._client.flushall()
            db._client.config_set("appendfsync", "no")
            unsynced = bench_appends(db, work)
            print(f"without fsync: {unsynced.per_s:.0f}/s appends, {unsynced.raw_xadd_per_s:.0f}/s plain XADD", flush=True)
        start = time.perf_counter()
        report = ledgerfile.verify_file(exported)
        verify_s = time.perf_counter() - start
        if not report.ok:
            raise SystemExit(f"bench ledger does not verify: {report.problem}")
        print(f"ledger verify of {report.entries} entries: {verify_s:.2f} s on {os.cpu_count()} threads", flush=True)
        start = time.perf_counter()
        ledger.verify_chain(ledgerfile.read(exported), threads=1)
        one_thread_s = time.perf_counter() - start
        print(f"reference: the same on one thread: {one_thread_s:.2f} s", flush=True)
        checked = bench_verify_ratio(exported.read_bytes())
        print(f"signed results checked: {checked.results_per_s:.0f}/s by ledger verify", flush=True)
        print(f"reference: raw Ed25519 verify: {checked.raw_per_s:.0f}/s", flush=True)
    print(
        json.dumps(
            {
                "appends_per_s": round(synced.per_s, 1),
                "raw_xadd_per_s": round(synced.raw_xadd_per_s, 1),
                "append_ms_median": round(synced.median_ms, 3),
                "appends_per_s_fsync_off": round(unsynced.per_s, 1),
                "raw_xadd_per_s_fsync_off": round(unsynced.raw_xadd_per_s, 1),
                "verify_1000_iterations_s": round(verify_s * 1000 / args.iterations, 3),
                "verify_1000_iterations_s_one_thread": round(one_thread_s * 1000 / args.iterations, 3),
                "verify_threads": os.cpu_count(),
                "verify_threads_speedup": round(one_thread_s / verify_s, 2),
                "verify_results_per_s": round(checked.results_per_s, 1),
                "raw_verify_per_s": round(checked.raw_per_s, 1),
                "verify_vs_raw": round(checked.median_block_ratio, 3),
                "verify_vs_raw_total": round(checked.results_per_s / checked.raw_per_s, 3),
                "population": POPULATION,
                "iterations": args.iterations,
            }
        )
    )

if __name__ == "__main__":
    main()
