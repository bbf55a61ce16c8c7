"""Entries parsed once, and their results' worker signatures checked ahead of the chain walk on every core."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Iterable, Iterator, Sequence, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from swarmtune import entries, identity
from swarmtune.entries import EntryError, Iteration, Signed, StoredEntry, WorkerResult

# (body, signature) of a worker-signed record.
Signature = tuple[bytes, bytes]

# An entry, or why its bytes are not one: the walk reports that when it reaches the entry, in order.
Parsed = Union[StoredEntry, EntryError]

# Results are checked ahead in chunks of this many (one pool task each), this many entries at a time.
RESULT_CHUNK = 128
PRECHECK_WINDOW = 64


def parse(stored: bytes) -> Parsed:
    try:
        return entries.parse_entry(stored)
    except EntryError as exc:
        return exc


def _good_results(results: Sequence[Signed[WorkerResult]]) -> list[Signature]:
    """(body, signature) of the results whose signature verifies under the worker key each names."""
    keys: dict[bytes, Ed25519PublicKey | None] = {}
    good = []
    for signed in results:
        worker = signed.record.worker_key
        if worker not in keys:
            try:
                keys[worker] = identity.load_public_key(worker)
            except ValueError:
                keys[worker] = None  # the chain walk says why
        key = keys[worker]
        if key is not None and entries.verify_record(signed, key):
            good.append((signed.body, signed.signature))
    return good


def checked_results(parsed: Iterable[Parsed], pool: ThreadPoolExecutor, skip: Collection[Signature] = ()) -> frozenset[Signature]:
    """The results of these entries (but those in `skip`) whose signatures verify, checked on `pool`
    (Ed25519 verification releases the GIL, so they use every core). Bytes that did not parse add nothing."""
    results = [
        signed
        for entry in parsed
        if isinstance(entry, StoredEntry) and isinstance(entry.entry.body, Iteration)
        for signed in entry.entry.body.results
        if (signed.body, signed.signature) not in skip
    ]
    if len(results) <= RESULT_CHUNK:  # one chunk: here, without a hand-over to the pool
        return frozenset(_good_results(results))
    chunks = [results[i : i + RESULT_CHUNK] for i in range(0, len(results), RESULT_CHUNK)]
    return frozenset(pair for good in pool.map(_good_results, chunks) for pair in good)


def _windows(parsed: Iterator[Parsed], pool: ThreadPoolExecutor, skip: Collection[Signature]) -> Iterator[tuple[Parsed, frozenset[Signature]]]:
    while window := list(itertools.islice(parsed, PRECHECK_WINDOW)):
        checked = checked_results(window, pool, skip)
        yield from ((entry, checked) for entry in window)


def prechecked(
    stored_entries: Iterable[bytes],
    threads: int | None = None,
    skip: Collection[Signature] = (),
    pool: ThreadPoolExecutor | None = None,
) -> Iterator[tuple[Parsed, frozenset[Signature]]]:
    """Each stored entry parsed (once), with the results (but those in `skip`) whose signatures were
    verified ahead of the sequential checks: on `pool` (a caller's, kept across calls), else on
    `threads` threads (None: one per CPU; 1: none ahead, the walk checks every signature)."""
    parsed = map(parse, stored_entries)
    if pool is not None:
        yield from _windows(parsed, pool, skip)
        return
    threads = threads or os.cpu_count() or 1
    if threads == 1:
        yield from ((entry, frozenset()) for entry in parsed)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="swarmtune-verify") as own:
        yield from _windows(parsed, own, skip)
