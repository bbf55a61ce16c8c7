"""A submission's items checked against the open round, and the accepted ones taken into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from swarmtune.batches import Batch
from swarmtune.coordinator import validation
from swarmtune.coordinator.round import Round, batch_field, retention_field
from swarmtune.coordinator.validation import BatchCheck, Checked
from swarmtune.entries import RetentionReport
from swarmtune.wire import service_pb2 as pb


@dataclass(frozen=True)
class Intake:
    """What one submission brought: a check per batch (and per member) and per report, and what the
    round took (with its Redis fields)."""

    batches: Sequence[BatchCheck]
    retention: Sequence[Checked[RetentionReport]]
    fields: Mapping[bytes, bytes]  # the taken items' fields of the open-iteration hash

    @property
    def checks(self) -> list[Checked[Any]]:
        return [*(c for batch in self.batches for c in batch.checks), *self.retention]

    def reply(self) -> pb.SubmitReply:
        return pb.SubmitReply(
            batches=[c.status() for c in self.batches],
            retention=[pb.ItemStatus(reason=c.reason, detail=c.detail) for c in self.retention],
        )

    def give_back(self, current: Round, key: bytes) -> None:
        """Undo the taking: the items could not be stored, so they were never acknowledged."""
        for checked in self.batches:
            if checked.batch is not None:
                current.withdraw(checked.batch, checked.accepted)
        if retention_field(key) in self.fields:
            current.retention.pop(key, None)


def take(
    context: validation.Context,
    current: Round | None,
    batches: Sequence[bytes],
    retention: Sequence[bytes],
    vouched: Mapping[bytes, Batch],
) -> Intake:
    """Check each item of `context.worker_key`'s submission; `current` (None: no iteration takes
    results) takes the accepted ones. `vouched`: batches already decoded and verified (verifier.py)."""
    key = context.worker_key
    batch_checks, retention_checks, fields = [], [], {}
    for data in batches:
        if current is None:
            checked = validation.check_batch(context, data, (), {}, (), vouched)
        else:
            checked = validation.check_batch(context, data, current.assigned.get(key, ()), current.held_rewards(key), current.settled, vouched)
        accepted = checked.accepted
        if accepted and current is not None and checked.batch is not None:
            current.accept(checked.batch, accepted)
            fields[batch_field(checked.batch)] = data
        batch_checks.append(checked)
    for data in retention:
        held = current.retention.get(key) if current else None
        requested = current is not None and current.retention_worker == key
        checked_report = validation.check_retention(context, data, requested, held[1] if held else None)
        if checked_report.reason == pb.ACCEPTED and current is not None and checked_report.signed is not None:
            current.retention[key] = (checked_report.signed, data)
            fields[retention_field(key)] = data
        retention_checks.append(checked_report)
    return Intake(batch_checks, retention_checks, fields)
