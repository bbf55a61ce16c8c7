"""The open iteration as one worker holds it: members to evaluate, rewards measured, rewards not yet taken."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from swarmtune import batches, entries
from swarmtune.batches import Batch
from swarmtune.entries import NoisePlan, RetentionReport, Signed
from swarmtune.seeds import MemberNoise
from swarmtune.wire import service_pb2 as pb

# The coordinator holds these (ACCEPTED, DUPLICATE) or no longer wants them (SETTLED): never resend.
SETTLED_REASONS = frozenset({pb.ACCEPTED, pb.DUPLICATE, pb.SETTLED})

# Signs (members, rewards) as one batch of this worker for the open iteration.
Signer = Callable[[Sequence[int], Sequence[float]], Batch]


@dataclass(frozen=True)
class Opened:
    """An iteration announcement: its ledger head, its members' plan, and whether we also measure retention."""

    iteration: int
    head_hash: bytes
    plan: NoisePlan
    measure_retention: bool

    def noise(self, member: int) -> MemberNoise:
        return self.plan.noise(self.iteration, member)


def opened_from(message: pb.IterationOpened) -> Opened:
    return Opened(message.iteration, message.head_hash, entries.plan_from_pb(message.plan), message.measure_retention)


def member_statuses(members: Sequence[int], status: pb.BatchStatus) -> list[tuple[int, pb.ItemStatus]]:
    """Each member's answer: its own, or the batch's where the batch was refused whole."""
    if status.members:
        return list(zip(members, status.members))
    return [(member, status.status) for member in members]


@dataclass
class IterationWork:
    """One iteration's work; it survives reconnects so nothing is measured twice."""

    opened: Opened
    signer: Signer
    assigned: set[int] = field(default_factory=set)
    rewards: dict[int, float] = field(default_factory=dict)  # member -> reward measured
    unsent: set[int] = field(default_factory=set)  # members whose reward the coordinator has not taken
    signed: set[tuple[bytes, bytes]] = field(default_factory=set)  # (payload, signature) of our batches
    retention: Signed[RetentionReport] | None = None
    retention_unsent: bool = False

    @property
    def iteration(self) -> int:
        return self.opened.iteration

    def assign(self, members: Iterable[int]) -> None:
        """The coordinator's assignment to us (again after a reconnect): evaluate these, resend what we have.
        Rewards for members no longer ours are not sent: the coordinator would refuse them."""
        self.assigned, self.unsent = set(), set()
        self.add(members)

    def add(self, members: Iterable[int]) -> None:
        """More members for us (a straggler's): ours to evaluate, or to resend if we measured them already."""
        wanted = {m for m in members if m < self.opened.plan.population}
        self.assigned |= wanted
        self.unsent |= wanted & self.rewards.keys()

    def pending(self) -> list[MemberNoise]:
        """Assigned members without a reward yet, in member order."""
        return [self.opened.noise(m) for m in sorted(self.assigned - self.rewards.keys())]

    def own_signatures(self) -> frozenset[tuple[bytes, bytes]]:
        """(payload, signature) of every batch we signed: the closing entry's copies need no verifying."""
        return frozenset(self.signed)

    def record(self, rewards: Mapping[int, float]) -> None:
        self.rewards.update(rewards)
        self.unsent |= rewards.keys()

    def batch(self, members: Sequence[int]) -> bytes:
        """These members' rewards, signed as one batch (Ed25519 is deterministic: a resend is the same bytes)."""
        batch = self.signer(members, [self.rewards[m] for m in members])
        self.signed.add(batch.signed)
        return batches.encode_batch(batch)

    def record_retention(self, signed: Signed[RetentionReport]) -> None:
        self.retention, self.retention_unsent = signed, True

    def retention_due(self) -> bool:
        return self.opened.measure_retention and self.retention is None

    def untaken(self) -> tuple[list[int], list[bytes]]:
        """(members, encoded retention report) not yet taken by the coordinator."""
        retention = [entries.encode_signed(self.retention)] if self.retention is not None and self.retention_unsent else []
        return sorted(self.unsent), retention

    def settle(self, members: list[int], reply: pb.SubmitReply, retention_sent: bool) -> list[tuple[int, pb.ItemStatus]]:
        """Mark what the coordinator answered (taken, or rejected for good); returns the rejections."""
        rejected = []
        answers = member_statuses(members, reply.batches[0]) if members and reply.batches else []
        for member, status in answers:
            self.unsent.discard(member)
            if status.reason not in SETTLED_REASONS:
                rejected.append((member, status))
        if retention_sent and reply.retention:
            self.retention_unsent = False
            if reply.retention[0].reason not in SETTLED_REASONS:
                rejected.append((-1, reply.retention[0]))
        return rejected
