"""The open iteration read back from Redis after a restart: nothing in it counts until it passes the
checks a fresh submission passes (whoever can write Redis could have added anything)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Mapping

from swarmtune import batches, identity
from swarmtune.coordinator import lifecycle, validation
from swarmtune.coordinator.chain import History
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.coordinator.round import BATCH_PREFIX, META_FIELD, RETENTION_PREFIX, Round, batch_field
from swarmtune.entries import HASH_BYTES
from swarmtune.jobspec import JobSpec
from swarmtune.wire import service_pb2 as pb

log = logging.getLogger("swarmtune.coordinator")


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
    submission of the worker that signed it, at the ledger's admissions and revocations; items (or
    batch members) that fail are dropped and logged with their reason. `context` is the open
    iteration's (any worker key)."""
    for name, data in sorted(fields.items()):
        if name == META_FIELD:
            continue
        if name.startswith(BATCH_PREFIX):
            _restore_batch(context, current, name, data)
            continue
        checked = _check_retention(context, current, name, data, retention_due)
        if checked.reason != pb.ACCEPTED or checked.signed is None:
            item = "retention report" if name.startswith(RETENTION_PREFIX) else "field"
            _log_dropped(current.open.iteration, item, name[1 : 1 + HASH_BYTES], checked.reason, checked.detail)
            continue
        current.retention[checked.signed.record.worker_key] = (checked.signed, data)


def _restore_batch(context: validation.Context, current: Round, name: bytes, data: bytes) -> None:
    """A stored batch, judged as if the worker that signed it submitted it now. Which members a worker
    was given is not stored (it depended on who was connected): any member of the iteration may be
    held. Settledness is not re-judged: an accepted replica stays."""
    iteration = current.open.iteration
    try:
        key = batches.decode_batch(data).worker_key
    except batches.BatchError as exc:
        _log_dropped(iteration, "result batch", b"", pb.MALFORMED, str(exc))
        return
    checked = validation.check_batch(replace(context, worker_key=key), data, current.open.numbers, current.held_rewards(key), ())
    if checked.batch is not None and name != batch_field(checked.batch):
        _log_dropped(iteration, "result batch", key, pb.MALFORMED, "stored under another batch's field")
        return
    if checked.batch is None or checked.reason != pb.ACCEPTED:
        _log_dropped(iteration, "result batch", key, checked.reason, checked.detail)
        return
    for member, status in zip(checked.batch.members, checked.members):
        if status.reason not in (pb.ACCEPTED, pb.DUPLICATE):
            _log_dropped(iteration, "result", key, status.reason, f"member {member}: {status.detail}")
    current.accept(checked.batch, checked.accepted)
    current.give(key, checked.accepted)


def _check_retention(context: validation.Context, current: Round, name: bytes, data: bytes, retention_due: bool) -> validation.Checked[Any]:
    """A stored retention report, judged as if its worker (the one its field names) submitted it now."""
    if name.startswith(RETENTION_PREFIX) and len(name) == 1 + HASH_BYTES:
        # One worker is asked per iteration where retention is due: the first report that passes.
        as_submitted = replace(context, worker_key=name[1:])
        return validation.check_retention(as_submitted, data, retention_due and not current.retention, None)
    return validation.Checked(pb.MALFORMED, "not a field the coordinator writes")


def _log_dropped(iteration: int, item: str, key: bytes, reason: int, detail: str) -> None:
    log.warning(
        "dropped a stored item of the open iteration",
        extra={
            "iteration": iteration,
            "item": item,
            "worker": identity.fingerprint(key) if len(key) == HASH_BYTES else "-",
            "reason": pb.Reason.Name(reason),
            "detail": detail,
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
