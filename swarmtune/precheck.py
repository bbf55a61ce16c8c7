"""Entries parsed once, and their result batches' worker signatures checked ahead of the chain walk on every core."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Iterable, Iterator, Sequence, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from swarmtune import batches, entries, identity
from swarmtune.batches import Recorded
from swarmtune.entries import EntryError, Iteration, StoredEntry

# (payload, signature) of a worker-signed result batch.
Signature = tuple[bytes, bytes]

# An entry, or why its bytes are not one: the walk reports that when it reaches the entry, in order.
Parsed = Union[StoredEntry, EntryError]

# Batches are checked ahead in chunks of this many (one pool task each), this many entries at a time.
BATCH_CHUNK = 16
PRECHECK_WINDOW = 64


def parse(stored: bytes) -> Parsed:
    try:
        return entries.parse_entry(stored)
    except EntryError as exc:
        return exc


def _good_batches(recorded: Sequence[Recorded]) -> list[Signature]:
    """(payload, signature) of the batches whose signature verifies under the worker key each names."""
    keys: dict[bytes, Ed25519PublicKey | None] = {}
    good = []
    for item in recorded:
        batch = item.batch
        if batch.worker_key not in keys:
            try:
                keys[batch.worker_key] = identity.load_public_key(batch.worker_key)
            except ValueError:
                keys[batch.worker_key] = None  # the chain walk says why
        key = keys[batch.worker_key]
        if key is not None and batches.verify_batch(batch, key):
            good.append(batch.signed)
    return good


def checked_batches(parsed: Iterable[Parsed], pool: ThreadPoolExecutor, skip: Collection[Signature] = ()) -> frozenset[Signature]:
    """The batches of these entries (but those in `skip`) whose signatures verify, checked on `pool`
    (Ed25519 verification releases the GIL, so they use every core). Bytes that did not parse add nothing."""
    recorded = [
        item
        for entry in parsed
        if isinstance(entry, StoredEntry) and isinstance(entry.entry.body, Iteration)
        for item in entry.entry.body.batches
        if item.batch.signed not in skip
    ]
    if len(recorded) <= BATCH_CHUNK:  # one chunk: here, without a hand-over to the pool
        return frozenset(_good_batches(recorded))
    chunks = [recorded[i : i + BATCH_CHUNK] for i in range(0, len(recorded), BATCH_CHUNK)]
    return frozenset(pair for good in pool.map(_good_batches, chunks) for pair in good)


def _windows(parsed: Iterator[Parsed], pool: ThreadPoolExecutor, skip: Collection[Signature]) -> Iterator[tuple[Parsed, frozenset[Signature]]]:
    while window := list(itertools.islice(parsed, PRECHECK_WINDOW)):
        checked = checked_batches(window, pool, skip)
        yield from ((entry, checked) for entry in window)


def prechecked(
    stored_entries: Iterable[bytes],
    threads: int | None = None,
    skip: Collection[Signature] = (),
    pool: ThreadPoolExecutor | None = None,
) -> Iterator[tuple[Parsed, frozenset[Signature]]]:
    """Each stored entry parsed (once), with the batches (but those in `skip`) whose signatures were
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
