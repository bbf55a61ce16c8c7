"""The C heap of a long-lived process: glibc's malloc arenas capped, so threads reuse each other's freed memory."""

from __future__ import annotations

import ctypes
import os

# mallopt's parameter for the most arenas glibc creates (malloc.h: M_ARENA_MAX).
M_ARENA_MAX = -8
# A worker's threads (compute, attestation, gRPC's, the signature verifiers: up to one per core) each
# get an arena of their own by default (up to 8 per core), and an arena keeps what its thread freed
# resident for that thread alone: the chunk temporaries of the dense update and members end up held
# in one arena while the next pass allocates in another. The main arena and one shared by every other
# thread. With the tokenizer's release (models.drop_tokenizer_sources) the 0.5B dense worker's peak
# went from 3.49 to 3.45 GB (docs/SCALE.md).
WORKER_ARENAS = 2


def cap_arenas(count: int) -> bool:
    """At most `count` malloc arenas from now on (threads that already have one keep it). False, and
    nothing changed, where the C library has no such setting (not glibc) or MALLOC_ARENA_MAX is set
    (the operator's choice stands)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, count))
