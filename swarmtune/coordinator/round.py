"""The open iteration's working state: accepted items, who holds which member, and its Redis fields."""

from __future__ import annotations

import asyncio
import struct
from typing import Iterable, Mapping

from swarmtune import assignlog
from swarmtune.assignlog import Given
from swarmtune.batches import Batch
from swarmtune.coordinator.close import Accepted, Panel
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.entries import RetentionReport, Signed, assignment_to_pb
from swarmtune.redundancy import needs_referee, settled, wanted
from swarmtune.wire import ledger_pb2 as pb

# Fields of the open-iteration hash in Redis (store.get_open/put_open): the meta record, then one
# field per batch a member was accepted from, and per retention report, holding its exact submitted bytes;
# the opening's candidates, and the later assignments (one field per batch of them, numbered in order),
# and each worker that left holding unanswered members (named by when it left and its key).
META_FIELD = b"meta"
BATCH_PREFIX = b"b"
RETENTION_PREFIX = b"t"
PANEL_FIELD = b"p"
GIVEN_PREFIX = b"a"
DEPARTURE_PREFIX = b"r"


def batch_field(batch: Batch) -> bytes:
    return BATCH_PREFIX + batch.signature


def departure_field(position: int, key: bytes) -> bytes:
    """The field that says `key` left holding unanswered members after `position` later assignments
    (the same departure twice names the same field)."""
    return DEPARTURE_PREFIX + struct.pack(">I", position) + key


def retention_field(key: bytes) -> bytes:
    return RETENTION_PREFIX + key


class Round:
    """Mutable state of one open iteration; the job drives it, pure helpers decide."""

    def __init__(self, open_iteration: OpenIteration, target: int, tolerance: float) -> None:
        self.open = open_iteration
        self.target = target  # replicas each member needs (redundancy, capped by distinct operators)
        self.tolerance = tolerance
        self.panel = Panel()  # referees, spot checks and the draw (see `empanel`)
        self.held: dict[bytes, dict[int, float]] = {}  # worker -> member -> accepted reward
        self.source: dict[tuple[bytes, int], Batch] = {}  # (worker, member) -> the batch it was accepted from
        self.batches: dict[bytes, dict[bytes, Batch]] = {}  # worker -> signature -> a batch members were accepted from
        self.replicas: dict[int, dict[bytes, float]] = {}  # member -> worker -> reward
        self.several: set[int] = set()  # members with more than one replica
        self.withdrawn = 0  # how many times `withdraw` ran (a close built before one is built again)
        self.settled: set[int] = set()
        self.assigned: dict[bytes, set[int]] = {}  # every member ever given to a worker this iteration
        self.holders: dict[int, set[bytes]] = {}  # member -> workers currently expected to answer
        self.retention: dict[bytes, tuple[Signed[RetentionReport], bytes]] = {}
        self.retention_worker: bytes | None = None
        self.stolen: set[int] = set()  # members given an extra holder since the straggle point
        self.lost: set[int] = set()  # members a worker left holding unanswered
        self.given: list[Given] = []  # members given after the opening, why, and who could take them
        self.journaled = 0  # how many of `given` were posted to Redis
        self.next_field = 0  # number of the next GIVEN_PREFIX field
        # (len(given) when it left, worker): journaled, so a restart stops holding the same members
        # with them as the LOST assignments that followed, instead of expecting both holders.
        self.departed: list[tuple[int, bytes]] = []
        self.departures_journaled = 0
        self.panel_journaled = False  # PANEL_FIELD posted (or read back)
        self.wanting: set[int] = set(open_iteration.numbers)  # members that may lack holders (checked lazily)
        self.opened_bytes: bytes | None = None  # serialized common part of IterationOpened
        self.closing = False
        self.settled_ms: int | None = None  # when the last needed result arrived
        # Resolved once the iteration entry is appended: the submission that completed the round is
        # acknowledged then (the entry records what it brought), with no journal write of its own.
        self.appended: asyncio.Future[None] | None = None

    # ---- results --------------------------------------------------------------------------

    def held_rewards(self, key: bytes) -> Mapping[int, float]:
        """member -> the reward accepted from this worker."""
        return self.held.get(key, {})

    def accept(self, batch: Batch, members: Iterable[int]) -> None:
        """Take these members of `batch` (checked: validation.check_batch)."""
        key = batch.worker_key
        held = self.held.setdefault(key, {})
        rewards = dict(zip(batch.members, batch.rewards))
        taken = {m: rewards[m] for m in members}
        if taken:
            self.batches.setdefault(key, {})[batch.signature] = batch
        if not self.panel.referees and self.replicas.keys().isdisjoint(taken):
            # The common case, taken whole: first replicas under majority rule, which settle
            # exactly when one replica is enough (what _resettle would find member by member).
            held.update(taken)
            self.source.update(((key, m), batch) for m in taken)
            self.replicas.update((m, {key: r}) for m, r in taken.items())
            if self.target <= 1:
                self.settled.update(taken)
            return
        for member, reward in taken.items():
            held[member] = reward
            self.source[key, member] = batch
            self.replicas.setdefault(member, {})[key] = reward
            if len(self.replicas[member]) > 1:
                self.several.add(member)
            self._resettle(member)
            if member not in self.settled and len(self.replicas[member]) >= self.target:
                self.wanting.add(member)  # disputed: it wants another opinion

    def withdraw(self, batch: Batch, members: Iterable[int]) -> None:
        """Undo `accept` (the batch could not be stored, so it was never acknowledged)."""
        key = batch.worker_key
        for member in members:
            del self.held[key][member], self.source[key, member], self.replicas[member][key]
            if len(self.replicas[member]) < 2:
                self.several.discard(member)
            self._resettle(member)
            self.wanting.add(member)
        if not any(self.source.get((key, m)) is batch for m in batch.members):
            self.batches.get(key, {}).pop(batch.signature, None)
        self.withdrawn += 1

    def empanel(self, panel: Panel) -> None:
        """Judge under these referees and spot checks from now on: re-judge every member."""
        self.panel = panel
        for member in self.replicas:  # a member without replicas is not settled, under any panel
            self._resettle(member)
        self.wanting.update(self.open.numbers)

    def retarget(self, target: int) -> None:
        """Replicas needed changed (distinct operators came or went): re-judge every member."""
        if target != self.target:
            self.target = target
            for member in self.open.numbers:
                self._resettle(member)
            self.wanting.update(self.open.numbers)

    def _resettle(self, member: int) -> None:
        panel = self.panel
        if settled(self.replicas.get(member, {}), self.target, self.tolerance, panel.referees, member in panel.spot):
            self.settled.add(member)
        else:
            self.settled.discard(member)

    def accepted(self) -> Accepted:
        """What the close reads (the maps themselves: it runs with no await while it reads them)."""
        return Accepted(self.held, self.replicas, self.several, self.batches, self.source)

    def result_count(self) -> int:
        return sum(len(got) for got in self.held.values())

    # ---- assignment -----------------------------------------------------------------------

    def give(self, key: bytes, members: Iterable[int]) -> None:
        for member in members:
            self.assigned.setdefault(key, set()).add(member)
            self.holders.setdefault(member, set()).add(key)

    def give_later(self, given: Iterable[Given]) -> None:
        """Members given after the opening: held like the opening's, and recorded for the entry."""
        for record in given:
            self.give(record.worker, (record.member,))
            self.given.append(record)

    def unjournaled(self) -> dict[bytes, bytes]:
        """The opening's candidates (first time), the later assignments and departures not yet posted, as Redis fields."""
        out = {} if self.panel_journaled else {PANEL_FIELD: panel_value(self.panel)}
        self.panel_journaled = True
        if self.journaled < len(self.given):
            others, assignments = assignlog.encode(self.given[self.journaled :], self.panel.candidates)
            message = pb.Iteration(others=others, assignments=map(assignment_to_pb, assignments))
            out[GIVEN_PREFIX + struct.pack(">I", self.next_field)] = message.SerializeToString()
            self.journaled = len(self.given)
            self.next_field += 1
        out.update((departure_field(position, key), b"") for position, key in self.departed[self.departures_journaled :])
        self.departures_journaled = len(self.departed)
        return out

    def pending(self, key: bytes) -> list[int]:
        """Members this worker holds and has not answered, in member order."""
        answered = self.held.get(key, {})
        return sorted(m for m in self.assigned.get(key, ()) if key in self.holders.get(m, ()) and m not in answered and m not in self.settled)

    def release(self, key: bytes) -> None:
        """The worker is gone: it stops holding what it has not answered (it may still submit it)."""
        pending = self.pending(key)
        if pending:
            self.departed.append((len(self.given), key))
        for member in pending:
            self.holders[member].discard(key)
            self.wanting.add(member)
            self.lost.add(member)

    def needs(self) -> dict[int, int]:
        """member -> extra untrusted holders wanted: replicas missing beyond what current holders still owe."""
        out = {}
        referees = self.panel.referees
        for m in sorted(self.wanting):
            if not referees and (m in self.settled or not self.replicas.get(m)):
                # The common case, right after an opening: settled, or every holder still owes.
                extra = 0 if m in self.settled else self.target - len(self.holders.get(m, ()))
            else:
                replicas = {k: r for k, r in self.replicas.get(m, {}).items() if k not in referees}
                owed = sum(1 for k in self.holders.get(m, ()) if k not in replicas and k not in referees)
                extra = 0 if m in self.settled else wanted(replicas, self.target, self.tolerance, referees) - len(replicas) - owed
            if extra > 0:
                out[m] = extra
            elif not referees or not self._wants_referee(m):  # without referees, none is wanted
                self.wanting.discard(m)
        return out

    def referee_needs(self) -> dict[int, int]:
        """member -> 1 for members a referee must re-evaluate that no referee holds yet."""
        if not self.panel.referees:  # the common case: no member to look at
            return {}
        return {m: 1 for m in sorted(self.wanting) if self._wants_referee(m) and not self.holders.get(m, set()) & self.panel.referees}

    def _wants_referee(self, member: int) -> bool:
        panel = self.panel
        return member not in self.settled and needs_referee(self.replicas.get(member, {}), self.tolerance, panel.referees, member in panel.spot)

    def straggling(self) -> dict[int, int]:
        """Members still owed by someone, not yet given an extra holder since the straggle point."""
        return {m: 1 for m in self.open.numbers if m not in self.settled and m not in self.stolen and self.holders.get(m)}

    def load(self, key: bytes) -> int:
        return len(self.pending(key))


def panel_value(panel: Panel) -> bytes:
    """PANEL_FIELD's value: the opening's candidates, capacities and operators."""
    return pb.Iteration(candidates=panel.candidates, capacities=panel.capacities, operators=panel.operators).SerializeToString()
