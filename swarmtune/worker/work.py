"""The open iteration as one worker holds it: members to evaluate, results signed, results not yet taken."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from swarmtune import entries
from swarmtune.entries import RetentionReport, Signed, WorkerResult
from swarmtune.seeds import MemberNoise
from swarmtune.wire import service_pb2 as pb

# The coordinator holds these (ACCEPTED, DUPLICATE) or no longer wants them (SETTLED): never resend.
SETTLED_REASONS = frozenset({pb.ACCEPTED, pb.DUPLICATE, pb.SETTLED})


@dataclass(frozen=True)
class Opened:
    """An iteration announcement: its ledger head, members, and whether we also measure retention."""

    iteration: int
    head_hash: bytes
    members: Mapping[int, MemberNoise]
    measure_retention: bool


def opened_from(message: pb.IterationOpened) -> Opened:
    members = {m.member: MemberNoise(m.member, m.seed, m.sign) for m in message.members}
    return Opened(message.iteration, message.head_hash, members, message.measure_retention)


@dataclass
class IterationWork:
    """One iteration's work; it survives reconnects so nothing is measured twice."""

    opened: Opened
    assigned: set[int] = field(default_factory=set)
    results: dict[int, Signed[WorkerResult]] = field(default_factory=dict)
    unsent: set[int] = field(default_factory=set)  # members whose result the coordinator has not taken
    retention: Signed[RetentionReport] | None = None
    retention_unsent: bool = False

    @property
    def iteration(self) -> int:
        return self.opened.iteration

    def assign(self, members: Iterable[int]) -> None:
        """The coordinator's assignment to us (again after a reconnect): evaluate these, resend what we have.
        Results for members no longer ours are dropped: the coordinator would refuse them."""
        self.assigned, self.unsent = set(), set()
        self.add(members)

    def add(self, members: Iterable[int]) -> None:
        """More members for us (a straggler's): ours to evaluate, or to resend if we measured them already."""
        wanted = set(members) & set(self.opened.members)
        self.assigned |= wanted
        self.unsent |= wanted & set(self.results)

    def pending(self) -> list[MemberNoise]:
        """Assigned members without a result yet, in member order."""
        return [self.opened.members[m] for m in sorted(self.assigned - set(self.results))]

    def own_signatures(self) -> frozenset[tuple[bytes, bytes]]:
        """(body, signature) of every result we signed: the closing entry's copies need no verifying."""
        return frozenset((signed.body, signed.signature) for signed in self.results.values())

    def record(self, signed: Iterable[Signed[WorkerResult]]) -> None:
        for result in signed:
            self.results[result.record.member] = result
            self.unsent.add(result.record.member)

    def record_retention(self, signed: Signed[RetentionReport]) -> None:
        self.retention, self.retention_unsent = signed, True

    def retention_due(self) -> bool:
        return self.opened.measure_retention and self.retention is None

    def untaken(self) -> tuple[list[int], list[bytes], list[bytes]]:
        """(members, their encoded results, encoded retention report) not yet taken by the coordinator."""
        members = sorted(self.unsent)
        results = [entries.encode_signed(self.results[m]) for m in members]
        retention = [entries.encode_signed(self.retention)] if self.retention is not None and self.retention_unsent else []
        return members, results, retention

    def settle(self, members: list[int], reply: pb.SubmitReply, retention_sent: bool) -> list[tuple[int, pb.ItemStatus]]:
        """Mark what the coordinator answered (taken, or rejected for good); returns the rejections."""
        rejected = []
        for member, status in zip(members, reply.results):
            self.unsent.discard(member)
            if status.reason not in SETTLED_REASONS:
                rejected.append((member, status))
        if retention_sent and reply.retention:
            self.retention_unsent = False
            if reply.retention[0].reason not in SETTLED_REASONS:
                rejected.append((-1, reply.retention[0]))
        return rejected
