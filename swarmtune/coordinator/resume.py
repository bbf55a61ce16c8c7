"""The open iteration read back from Redis after a restart: nothing in it counts until it passes the
checks a fresh submission passes (whoever can write Redis could have added anything)."""

from __future__ import annotations

import logging
import struct
from collections import deque
from dataclasses import replace
from typing import Any, Mapping

from google.protobuf.message import DecodeError

from swarmtune import assignlog, batches, identity
from swarmtune.assignment import Candidate, first_ranked
from swarmtune.coordinator import lifecycle, validation
from swarmtune.coordinator.chain import History
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.coordinator.round import (
    BATCH_PREFIX,
    DEPARTURE_PREFIX,
    GIVEN_PREFIX,
    META_FIELD,
    PANEL_FIELD,
    RETENTION_PREFIX,
    Round,
    batch_field,
)
from swarmtune.coordinator.scheduling import Scheduler
from swarmtune.entries import HASH_BYTES, assignment_from_pb
from swarmtune.jobspec import JobSpec
from swarmtune.wire import ledger_pb2, service_pb2 as pb

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
        if name in (META_FIELD, PANEL_FIELD) or _given_field(name) or name.startswith(DEPARTURE_PREFIX):
            continue  # read by `reopen`
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


def reopen(scheduler: Scheduler, current: Round, fields: Mapping[bytes, bytes], history: History) -> None:
    """Empanel a resumed round over the opening's candidates read back from `fields` (else those
    connected now: a fresh opening), holding the opening assignment and the later ones read back."""
    opening = _opening(fields.get(PANEL_FIELD), history)
    scheduler.reopen(current, scheduler.candidates() if opening is None else opening)
    current.panel_journaled = opening is not None
    if opening is None:
        return
    departures = _departures(current, fields, history)
    for name, data in sorted(fields.items()):
        if _given_field(name):
            _restore_given(current, name, data, history, departures)
    _depart(current, departures, None)
    current.departures_journaled = len(current.departed)


def _given_field(name: bytes) -> bool:
    return name.startswith(GIVEN_PREFIX) and len(name) == len(GIVEN_PREFIX) + 4


def _departures(current: Round, fields: Mapping[bytes, bytes], history: History) -> deque[tuple[int, bytes]]:
    """The workers that left holding unanswered members, by when they left: (how many later
    assignments had been made then, worker), each an admitted key (else dropped)."""
    found = []
    for name in sorted(fields):  # by position, then key
        if not name.startswith(DEPARTURE_PREFIX):
            continue
        named = name[len(DEPARTURE_PREFIX) :]
        if len(named) != 4 + HASH_BYTES or fields[name] or named[4:] not in history.admitted:
            _log_dropped(current.open.iteration, "departure", b"", pb.MALFORMED, "not a position and an admitted worker key")
            continue
        found.append((struct.unpack(">I", named[:4])[0], named[4:]))
    return deque(found)


def _depart(current: Round, departures: deque[tuple[int, bytes]], before: int | None) -> None:
    """Release, as when they left, the workers that left before later assignment number `before` (all: None)."""
    while departures and (before is None or departures[0][0] <= before):
        current.release(departures.popleft()[1])


def _opening(data: bytes | None, history: History) -> list[Candidate] | None:
    if data is None:
        return None
    try:
        message = ledger_pb2.Iteration.FromString(data)
    except DecodeError:
        message = None
    keys, capacities, operators = (list(message.candidates), list(message.capacities), list(message.operators)) if message else ([], [], [])
    stranger = any(key not in history.admitted or key in history.revoked for key in keys)
    problem = "it does not parse" if message is None else assignlog.opening_problem(keys, capacities, operators)
    if problem or stranger:
        log.warning("not resuming the stored opening; assigning afresh", extra={"reason": problem or "a candidate is not an admitted key"})
        return None
    return assignlog.opening_candidates(keys, capacities, operators)


def _restore_given(current: Round, name: bytes, data: bytes, history: History, departures: deque[tuple[int, bytes]]) -> None:
    """Later assignments read back, each checked for form, rank and an admitted worker (else dropped)."""
    candidates = current.panel.candidates
    try:
        message = ledger_pb2.Iteration.FromString(data)
    except DecodeError:
        _log_dropped(current.open.iteration, "later assignments", b"", pb.MALFORMED, "they do not parse")
        return
    others = tuple(message.others)
    size = len(candidates) + len(others)
    for record in map(assignment_from_pb, message.assignments):
        problem = assignlog.assignment_form(record, size, len(current.open.numbers))
        given = None if problem else assignlog.decode(candidates, others, [record])[0]
        if given is not None and given.worker not in history.admitted:
            problem = "its worker is not an admitted key"
        elif given is not None and first_ranked(current.panel.draw, given.member, given.eligible) != given.worker:
            problem = "the draw ranks another eligible worker first"
        if problem or given is None:
            _log_dropped(current.open.iteration, "later assignment", b"", pb.MALFORMED, problem or "")
            continue
        _depart(current, departures, len(current.given))
        current.give_later([given])
    current.journaled = len(current.given)
    current.next_field = max(current.next_field, int.from_bytes(name[len(GIVEN_PREFIX) :], "big") + 1)
