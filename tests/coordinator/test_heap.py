"""The serving coordinator's collector: what is alive once serving is frozen out of collections, which come rarer."""

from __future__ import annotations

import gc

from swarmtune.coordinator import heap


def test_settle_freezes_the_live_heap_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, heap.MIDDLE_THRESHOLD, heap.OLD_THRESHOLD)
        assert heap.YOUNG_THRESHOLD > before[0]
    finally:  # the rest of this test process collects as before
        gc.unfreeze()
        gc.set_threshold(*before)
