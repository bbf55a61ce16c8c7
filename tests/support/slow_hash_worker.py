"""A worker whose state hash takes HASH_DELAY_S longer (a model that hashes slowly, without its memory).

Run as `python -m tests.support.slow_hash_worker` with `swarmtune worker` arguments: the real daemon,
hashing every trained state (not genesis) after a pause longer than the coordinator's grace for the
final attestations, as hashing a multi-GB state does.
"""

from __future__ import annotations

import sys
import time

from swarmtune.cli import main
from swarmtune.replay import Replica

HASH_DELAY_S = 20.0  # > FINAL_ATTESTATION_GRACE_S: only a wait that follows the worker lets it attest
HONEST_HASH = Replica.state_hash


def slow_state_hash(replica: Replica) -> bytes:
    if replica.iteration > 0:
        time.sleep(HASH_DELAY_S)
    return HONEST_HASH(replica)


if __name__ == "__main__":
    Replica.state_hash = slow_state_hash  # type: ignore[method-assign]
    sys.exit(main(["worker", *sys.argv[1:]]))
