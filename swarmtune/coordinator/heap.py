"""The serving coordinator's garbage collector: the heap it starts with frozen, collections rarer."""

from __future__ import annotations

import gc

# Allocations (less deallocations) between young collections; Python's default is 700. A coordinator
# allocates a few objects per message and keeps few: at 1,000 workers the default collected so often
# that it took ~7% of the process's CPU (perf), mostly re-walking objects that live as long as the job.
YOUNG_THRESHOLD = 20_000
MIDDLE_THRESHOLD = 20  # young collections per middle one (default 10)
OLD_THRESHOLD = 100  # middle collections per full one (default 10; a full one also waits for 25% growth)


def settle() -> None:
    """Once serving: collect, then freeze what is alive (the ledger's history, the open round) out of
    every later collection, and collect less often. Reference counting still frees almost everything;
    the collector only has to find cycles, and fewer, larger collections find the same ones."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
