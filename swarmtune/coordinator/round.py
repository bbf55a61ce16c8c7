"""The open iteration's working state: accepted items, who holds which member, and its Redis fields."""

from __future__ import annotations

import asyncio
from typing import Collection, Iterable, Mapping

from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.coordinator.redundancy import settled, wanted
from swarmtune.entries import RetentionReport, Signed, WorkerResult

# Fields of the open-iteration hash in Redis (store.get_open/put_open): the meta record, then one
# field per accepted item holding its exact submitted bytes.
META_FIELD = b"meta"
RESULT_PREFIX = b"r"
RETENTION_PREFIX = b"t"


def result_field(key: bytes, member: int) -> bytes:
    return RESULT_PREFIX + key + member.to_bytes(4, "little")


def retention_field(key: bytes) -> bytes:
    return RETENTION_PREFIX + key


class Round:
    """Mutable state of one open iteration; the job drives it, pure helpers decide."""

    def __init__(self, open_iteration: OpenIteration, target: int, tolerance: float) -> None:
        self.open = open_iteration
        self.target = target  # replicas each member needs (redundancy, capped by distinct operators)
        self.tolerance = tolerance
        self.results: dict[bytes, dict[int, Signed[WorkerResult]]] = {}  # worker -> member -> result
        self.raw: dict[bytes, dict[int, bytes]] = {}  # worker -> member -> submitted bytes
        self.replicas: dict[int, dict[bytes, float]] = {}  # member -> worker -> reward
        self.settled: set[int] = set()
        self.assigned: dict[bytes, set[int]] = {}  # every member ever given to a worker this iteration
        self.holders: dict[int, set[bytes]] = {}  # member -> workers currently expected to answer
        self.retention: dict[bytes, tuple[Signed[RetentionReport], bytes]] = {}
        self.retention_worker: bytes | None = None
        self.stolen: set[int] = set()  # members given an extra holder since the straggle point
        self.wanting: set[int] = set(open_iteration.seeds)  # members that may lack holders (checked lazily)
        self.opened_bytes: bytes | None = None  # serialized common part of IterationOpened
        self.closing = False
        self.settled_ms: int | None = None  # when the last needed result arrived
        # Resolved once the iteration entry is appended: the submission that completed the round is
        # acknowledged then (the entry records what it brought), with no journal write of its own.
        self.appended: asyncio.Future[None] | None = None

    # ---- results --------------------------------------------------------------------------

    def accepted_bytes(self, key: bytes) -> Mapping[int, bytes]:
        """member -> the result bytes accepted from this worker."""
        return self.raw.get(key, {})

    def accept(self, signed: Signed[WorkerResult], data: bytes) -> None:
        key, member = signed.record.worker_key, signed.record.member
        self.results.setdefault(key, {})[member] = signed
        self.raw.setdefault(key, {})[member] = data
        self.replicas.setdefault(member, {})[key] = signed.record.reward
        self._resettle(member)
        if member not in self.settled and len(self.replicas[member]) >= self.target:
            self.wanting.add(member)  # disputed: it wants another opinion

    def withdraw(self, signed: Signed[WorkerResult]) -> None:
        """Undo `accept` (the result could not be stored, so it was never acknowledged)."""
        key, member = signed.record.worker_key, signed.record.member
        del self.results[key][member], self.raw[key][member], self.replicas[member][key]
        self._resettle(member)
        self.wanting.add(member)

    def retarget(self, target: int) -> None:
        """Replicas needed changed (distinct operators came or went): re-judge every member."""
        if target != self.target:
            self.target = target
            for member in self.open.seeds:
                self._resettle(member)
            self.wanting.update(self.open.seeds)

    def _resettle(self, member: int) -> None:
        if settled(self.replicas.get(member, {}), self.target, self.tolerance):
            self.settled.add(member)
        else:
            self.settled.discard(member)

    def raw_of(self, results: Iterable[Signed[WorkerResult]]) -> dict[bytes, dict[int, bytes]]:
        """worker -> member -> the accepted bytes of these results."""
        out: dict[bytes, dict[int, bytes]] = {}
        for signed in results:
            key, member = signed.record.worker_key, signed.record.member
            out.setdefault(key, {})[member] = self.raw[key][member]
        return out

    def all_results(self, excluded: Collection[bytes] = ()) -> list[Signed[WorkerResult]]:
        return [r for key, got in self.results.items() if key not in excluded for r in got.values()]

    def result_count(self) -> int:
        return sum(len(got) for got in self.results.values())

    # ---- assignment -----------------------------------------------------------------------

    def give(self, key: bytes, members: Iterable[int]) -> None:
        for member in members:
            self.assigned.setdefault(key, set()).add(member)
            self.holders.setdefault(member, set()).add(key)

    def pending(self, key: bytes) -> list[int]:
        """Members this worker holds and has not answered, in member order."""
        answered = self.raw.get(key, {})
        return sorted(m for m in self.assigned.get(key, ()) if key in self.holders.get(m, ()) and m not in answered and m not in self.settled)

    def release(self, key: bytes) -> None:
        """The worker is gone: it stops holding what it has not answered (it may still submit it)."""
        for member in self.pending(key):
            self.holders[member].discard(key)
            self.wanting.add(member)

    def needs(self) -> dict[int, int]:
        """member -> extra holders wanted: replicas missing beyond what current holders still owe."""
        out = {}
        for m in sorted(self.wanting):
            replicas = self.replicas.get(m, {})
            owed = sum(1 for k in self.holders.get(m, ()) if k not in replicas)
            extra = 0 if m in self.settled else wanted(replicas, self.target, self.tolerance) - len(replicas) - owed
            if extra > 0:
                out[m] = extra
            else:
                self.wanting.discard(m)
        return out

    def straggling(self) -> dict[int, int]:
        """Members still owed by someone, not yet given an extra holder since the straggle point."""
        return {m: 1 for m in self.open.seeds if m not in self.settled and m not in self.stolen and self.holders.get(m)}

    def load(self, key: bytes) -> int:
        return len(self.pending(key))
