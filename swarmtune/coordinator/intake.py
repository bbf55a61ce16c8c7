"""A submission's items checked against the open round, and the accepted ones taken into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from swarmtune.coordinator import validation
from swarmtune.coordinator.round import Round, result_field, retention_field
from swarmtune.coordinator.validation import Checked
from swarmtune.entries import RetentionReport, Signed, WorkerResult
from swarmtune.wire import service_pb2 as pb


@dataclass(frozen=True)
class Intake:
    """What one submission brought: a check per item, and what the round took (with its Redis fields)."""

    results: Sequence[Checked[WorkerResult]]
    retention: Sequence[Checked[RetentionReport]]
    fields: Mapping[bytes, bytes]  # the taken items' fields of the open-iteration hash
    taken: Sequence[Signed[WorkerResult]]

    @property
    def checks(self) -> list[Checked[Any]]:
        return [*self.results, *self.retention]

    def reply(self) -> pb.SubmitReply:
        return pb.SubmitReply(
            results=[pb.ItemStatus(reason=c.reason, detail=c.detail) for c in self.results],
            retention=[pb.ItemStatus(reason=c.reason, detail=c.detail) for c in self.retention],
        )

    def give_back(self, current: Round, key: bytes) -> None:
        """Undo the taking: the items could not be stored, so they were never acknowledged."""
        for signed in self.taken:
            current.withdraw(signed)
        if retention_field(key) in self.fields:
            current.retention.pop(key, None)


def take(context: validation.Context, current: Round | None, results: Sequence[bytes], retention: Sequence[bytes]) -> Intake:
    """Check each item of `context.worker_key`'s submission; `current` (None: no iteration takes
    results) takes the accepted ones."""
    key = context.worker_key
    result_checks, retention_checks, fields, taken = [], [], {}, []
    for data in results:
        if current is None:
            checked = validation.check_result(context, data, (), {}, ())
        else:
            checked = validation.check_result(context, data, current.assigned.get(key, ()), current.accepted_bytes(key), current.settled)
        if checked.reason == pb.ACCEPTED and current is not None and checked.signed is not None:
            current.accept(checked.signed, data)
            fields[result_field(key, checked.signed.record.member)] = data
            taken.append(checked.signed)
        result_checks.append(checked)
    for data in retention:
        held = current.retention.get(key) if current else None
        requested = current is not None and current.retention_worker == key
        checked_report = validation.check_retention(context, data, requested, held[1] if held else None)
        if checked_report.reason == pb.ACCEPTED and current is not None and checked_report.signed is not None:
            current.retention[key] = (checked_report.signed, data)
            fields[retention_field(key)] = data
        retention_checks.append(checked_report)
    return Intake(result_checks, retention_checks, fields, taken)
