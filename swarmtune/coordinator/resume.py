"""The open iteration read back from Redis after a restart: nothing in it counts until it passes the
checks a fresh submission passes (whoever can write Redis could have added anything)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Mapping

from swarmtune import identity
from swarmtune.coordinator import lifecycle, validation
from swarmtune.coordinator.chain import History
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.coordinator.round import META_FIELD, RESULT_PREFIX, RETENTION_PREFIX, Round, result_field
from swarmtune.entries import HASH_BYTES
from swarmtune.jobspec import JobSpec
from swarmtune.wire import service_pb2 as pb

log = logging.getLogger("swarmtune.coordinator")

MEMBER_BYTES = 4  # the u32le member number that ends a result field's name


def resumable(spec: JobSpec, meta: bytes, history: History, now_ms: int) -> OpenIteration | str:
    """The iteration `meta` says was open, or why it cannot be resumed: it must be the next one, opened
    at a head the ledger allows (the last iteration entry or one since: PROTOCOL §5.4)."""
    try:
        resumed = lifecycle.resume_iteration(spec, meta, now_ms)
    except (ValueError, KeyError, TypeError) as exc:
        return f"its meta record does not parse ({exc!r})"
    if resumed.iteration != history.last_iteration + 1:
        return f"it is iteration {resumed.iteration}, but the ledger's last iteration is {history.last_iteration}"
    if resumed.head_hash not in history.open_heads:
        return f"it was opened at head {resumed.head_hash.hex()[:16]}, not an entry since the ledger's last iteration"
    return resumed


def restore(context: validation.Context, current: Round, fields: Mapping[bytes, bytes], retention_due: bool) -> None:
    """Take back the items stored in the open-iteration hash, each checked (validation.py) as a fresh
    submission of the worker its field names, at the ledger's admissions and revocations; items that
    fail are dropped and logged with their reason. `context` is the open iteration's (any worker key)."""
    for name, data in sorted(fields.items()):
        if name == META_FIELD:
            continue
        checked = _check(context, current, name, data, retention_due)
        if checked.reason != pb.ACCEPTED or checked.signed is None:
            _log_dropped(current.open.iteration, name, checked)
            continue
        record = checked.signed.record
        if name.startswith(RESULT_PREFIX):
            current.accept(checked.signed, data)
            current.give(record.worker_key, [record.member])
        else:
            current.retention[record.worker_key] = (checked.signed, data)


def _check(context: validation.Context, current: Round, name: bytes, data: bytes, retention_due: bool) -> validation.Checked[Any]:
    """One stored item, judged as if its worker (the one its field names) submitted it now."""
    key = name[1 : 1 + HASH_BYTES]
    as_submitted = replace(context, worker_key=key)
    if name.startswith(RESULT_PREFIX) and len(name) == 1 + HASH_BYTES + MEMBER_BYTES:
        # Which members a worker was given is not stored (it depended on who was connected): any
        # member of the iteration may be held. Settledness is not re-judged: an accepted replica stays.
        checked = validation.check_result(as_submitted, data, current.open.seeds, current.accepted_bytes(key), ())
        if checked.signed is not None and name != result_field(key, checked.signed.record.member):
            return validation.Checked(pb.MALFORMED, f"stored under member {int.from_bytes(name[-MEMBER_BYTES:], 'little')}'s field")
        return checked
    if name.startswith(RETENTION_PREFIX) and len(name) == 1 + HASH_BYTES:
        # One worker is asked per iteration where retention is due: the first report that passes.
        return validation.check_retention(as_submitted, data, retention_due and not current.retention, None)
    return validation.Checked(pb.MALFORMED, "not a field the coordinator writes")


def _log_dropped(iteration: int, name: bytes, checked: validation.Checked[Any]) -> None:
    kind = {RESULT_PREFIX: "result", RETENTION_PREFIX: "retention report"}.get(name[:1], "field")
    key = name[1 : 1 + HASH_BYTES]
    log.warning(
        "dropped a stored item of the open iteration",
        extra={
            "iteration": iteration,
            "item": kind,
            "worker": identity.fingerprint(key) if len(key) == HASH_BYTES else "-",
            "reason": pb.Reason.Name(checked.reason),
            "detail": checked.detail,
        },
    )


def resume(spec: JobSpec, fields: Mapping[bytes, bytes], history: History, reward_range: tuple[float, float], now_ms: int) -> Round | None:
    """The round to resume from the open-iteration hash `fields`, or None (logged) when there is none."""
    meta = fields.get(META_FIELD)
    resumed = resumable(spec, meta, history, now_ms) if meta is not None else "it has no meta record"
    if isinstance(resumed, str):
        if fields:  # stored items of no iteration we can resume: dropped with the hash
            extra = {"reason": resumed, "iteration": history.last_iteration + 1, "fields": len(fields)}
            log.warning("not resuming the stored open iteration", extra=extra)
        return None
    current = Round(resumed, spec.redundancy, spec.redundancy_tolerance)
    context = validation.Context(
        job_id=spec.job_id,
        worker_key=b"",
        admitted=history.admitted,
        revoked=history.revoked,
        open_iteration=resumed,
        last_closed=history.last_iteration,
        reward_range=reward_range,
        recorded={},
    )
    restore(context, current, fields, spec.retention_due(resumed.iteration))
    current.retention_worker = next(iter(current.retention), None)
    return current
