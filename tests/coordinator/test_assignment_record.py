"""The coordinator records every assignment after the opening with its reason, keeps the record in
Redis with the open iteration, and a restart reads it back (PROTOCOL §6.6, §6.8)."""

from __future__ import annotations

import random

import pytest

from swarmtune import assignlog, assignment, identity
from swarmtune.assignment import Candidate
from swarmtune.coordinator import lifecycle
from swarmtune.coordinator.broadcast import Broadcaster
from swarmtune.coordinator.chain import recover
from swarmtune.coordinator.resume import reopen, resume
from swarmtune.coordinator.round import DEPARTURE_PREFIX, META_FIELD, PANEL_FIELD, Round, departure_field
from swarmtune.coordinator.scheduling import Scheduler
from swarmtune.coordinator.sessions import Sessions
from swarmtune.jobspec import parse_job_spec
from swarmtune.store import LedgerStore, connect
from tests.support.coordinator_harness import spec_text, write_genesis


@pytest.fixture
def store(redis_url: str) -> LedgerStore:
    return connect(redis_url)


def test_later_assignments_are_recorded_journaled_and_read_back(store: LedgerStore, job_id: str) -> None:
    spec = parse_job_spec(spec_text(job_id))  # population 6, redundancy 1
    key, workers = identity.generate_key(), [identity.generate_key() for _ in range(3)]
    keys = [identity.public_key_bytes(w) for w in workers]
    write_genesis(store, spec.spec_bytes, job_id, key, tuple(keys))
    history = recover(store.read(job_id), identity.public_key_bytes(key), 0.0)
    posted: dict[bytes, bytes] = {}
    sessions, broadcast = Sessions(1e6, 1e6), Broadcaster(100)
    scheduler = Scheduler(spec, history, sessions, broadcast, key, posted.update)
    for worker in keys[:2]:  # two workers of two members each: two of the six members stay unassigned
        sessions.open(worker, worker.hex(), 2, 0.0)
        broadcast.add(worker)
    opened = lifecycle.open_iteration(spec, 1, history.head.hash, 1000)
    current = scheduler.open_round(opened)
    assert current.panel.capacities == (2, 2) and current.panel.operators == () and current.given == []
    sessions.open(keys[2], "late", 6, 0.0)
    broadcast.add(keys[2])
    scheduler.reconcile(current)  # the late joiner takes the two unassigned members
    assert [(g.worker, g.reason, g.eligible) for g in current.given] == [(keys[2], assignlog.UNASSIGNED, frozenset({keys[2]}))] * 2
    lost = current.pending(keys[0])
    current.release(keys[0])
    broadcast.remove(broadcast.add(keys[0]))  # its stream ended
    scheduler.reconcile(current)
    assert [(g.member, g.reason) for g in current.given[2:]] == [(m, assignlog.LOST) for m in lost]
    assert PANEL_FIELD in posted and len([name for name in posted if name.startswith(b"a")]) == 2
    assert [name for name in posted if name.startswith(DEPARTURE_PREFIX)] == [departure_field(2, keys[0])]  # who left, when

    # A restart with nobody connected reads back the opening and the later assignments.
    fields = {META_FIELD: lifecycle.encode_open_meta(opened), **posted}
    resumed = resume(spec, fields, history, (0.0, 1.0), 2000)
    assert resumed is not None
    restarted = Scheduler(spec, history, Sessions(1e6, 1e6), Broadcaster(100), key, posted.update)
    reopen(restarted, resumed, fields, history)
    assert resumed.panel == current.panel and resumed.given == current.given
    assert resumed.assigned == current.assigned
    # The worker that left holds nothing again: only the LOST assignments' worker owes those members.
    assert resumed.holders == current.holders and resumed.lost == current.lost == set(lost)
    assert resumed.unjournaled() == {}  # nothing new to write back

    # A tampered record is dropped, not trusted.
    forged = next(name for name in posted if name.startswith(b"a"))
    again = resume(spec, {**fields, forged: b"\xff"}, history, (0.0, 1.0), 2000)
    assert isinstance(again, Round)
    reopen(restarted, again, {**fields, forged: b"\xff"}, history)
    assert len(again.given) < len(current.given)

    # A departure naming a key that was never admitted is dropped: nobody is released for it.
    stranger = {departure_field(0, identity.public_key_bytes(identity.generate_key())): b""}
    without = {name: value for name, value in fields.items() if not name.startswith(DEPARTURE_PREFIX)}
    forged_departure = resume(spec, {**without, **stranger}, history, (0.0, 1.0), 2000)
    assert isinstance(forged_departure, Round)
    reopen(restarted, forged_departure, {**without, **stranger}, history)
    assert forged_departure.departed == [] and keys[0] in forged_departure.holders[lost[0]]


def test_one_replica_deals_each_worker_its_quota_as_one_block_in_the_draws_order() -> None:
    rng = random.Random(5)
    for _ in range(200):
        capacities = [rng.choice((0, 1, 2, 3, 7)) for _ in range(rng.randint(1, 9))]
        members = sorted(rng.sample(range(40), min(40, sum(capacities) + rng.randint(0, 3))))
        pool = [Candidate(bytes([p]) * 32, str(p), c) for p, c in enumerate(capacities)]
        draw = rng.randbytes(64)
        order = assignment.drawn(pool, draw)
        quota = assignment.quotas(len(members), [c.capacity for c in order], cap=len(members))
        starts = [sum(quota[:i]) for i in range(len(quota))]
        blocks = {c.key: tuple(members[s : s + q]) for c, s, q in zip(order, starts, quota) if q}
        assert assignment.assign(members, pool, 1, draw) == blocks, capacities
