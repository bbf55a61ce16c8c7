"""The intake's whole-batch fast paths answer and count exactly as the member-by-member route would."""

from __future__ import annotations

import random

import pytest

from swarmtune import batches, identity, redundancy
from swarmtune.coordinator import lifecycle, validation
from swarmtune.coordinator.close import Panel
from swarmtune.coordinator.round import Round
from swarmtune.coordinator.validation import BatchCheck, Context
from swarmtune.jobspec import parse_job_spec
from swarmtune.wire import service_pb2 as pb
from tests.support.coordinator_harness import spec_text

HEAD = bytes(range(32))
POPULATION = 256


def _round(target: int) -> Round:
    spec = parse_job_spec(spec_text("fast", population=POPULATION))
    return Round(lifecycle.open_iteration(spec, 1, HEAD, 0), target, 0.0)


def _context(current: Round, key: bytes) -> Context:
    return Context("fast", key, {key}, set(), current.open, 0, (0.0, 1.0), {})


def _batch_of(key: object, members: list[int], liar: bool) -> batches.Batch:
    rewards = [((m + 5) % 10 if liar else m % 10) / 10 for m in members]
    return batches.sign_batch(key, "fast", 1, HEAD, members, rewards)  # type: ignore[arg-type]


def _batch(key: object, members: list[int]) -> batches.Batch:
    return _batch_of(key, members, liar=False)


@pytest.mark.parametrize("count", [0, 1, 16, 64, 4096])
def test_a_fresh_batch_status_is_the_member_by_member_message(count: int) -> None:
    accepted = validation.Checked(pb.ACCEPTED, "accepted")
    fresh = BatchCheck(pb.ACCEPTED, "taken apart: see each member", None, (accepted,) * count, fresh=True)
    slow = BatchCheck(pb.ACCEPTED, "taken apart: see each member", None, (accepted,) * count)
    assert fresh.status() == slow.status()
    assert fresh.status().SerializeToString() == slow.status().SerializeToString()  # the same bytes on the wire


def test_a_fresh_batch_is_taken_whole_and_one_with_a_resent_member_member_by_member() -> None:
    key = identity.generate_key()
    public = identity.public_key_bytes(key)
    current = _round(target=1)
    current.give(public, range(64))
    first = validation.check_batch(_context(current, public), batches.encode_batch(_batch(key, list(range(32)))), current.assigned[public], {}, set())
    assert first.fresh and first.accepted == list(range(32))
    assert first.status().members[0] == pb.ItemStatus(reason=pb.ACCEPTED, detail="accepted")
    assert first.batch is not None
    current.accept(first.batch, first.accepted)
    # A member resent with the same reward, one not assigned, one fresh: each gets its own reason.
    data = batches.encode_batch(_batch(key, [31, 32, 100]))
    mixed = validation.check_batch(_context(current, public), data, current.assigned[public], current.held_rewards(public), current.settled)
    assert not mixed.fresh
    assert [c.reason for c in mixed.members] == [pb.DUPLICATE, pb.ACCEPTED, pb.NOT_ASSIGNED]
    assert mixed.accepted == [32]


@pytest.mark.parametrize("target", [1, 2, 3])
@pytest.mark.parametrize("with_referee", [False, True])
def test_taking_a_batch_whole_settles_each_member_as_its_replicas_say(target: int, with_referee: bool) -> None:
    keys = [identity.generate_key() for _ in range(4)]
    publics = [identity.public_key_bytes(k) for k in keys]
    referees = frozenset(publics[:1]) if with_referee else frozenset()
    current = _round(target)
    current.empanel(Panel(referees=referees, spot=frozenset(range(0, POPULATION, 9))))
    rng = random.Random(target)
    expected: dict[int, dict[bytes, float]] = {}
    for i, (key, public) in enumerate(zip(keys, publics)):
        sample = sorted(rng.sample(range(POPULATION), 96))
        for members in (sample[:48], sample[48:]):  # two batches a worker
            batch = _batch_of(key, members, liar=i == 3)
            current.accept(batch, members)
            for member, reward in zip(batch.members, batch.rewards):
                expected.setdefault(member, {})[public] = reward
                assert current.source[public, member] is batch
    assert current.replicas == expected
    assert {k: v for k, v in current.held.items() if v} == {p: {m: r[p] for m, r in expected.items() if p in r} for p in publics}
    _assert_settled_as_judged(current, expected, target)
    # Another referee and other spot checks (as a resumed round is empanelled after its results): every member re-judged.
    current.empanel(Panel(referees=frozenset(publics[1:2]), spot=frozenset(range(0, POPULATION, 5))))
    _assert_settled_as_judged(current, expected, target)


def _assert_settled_as_judged(current: Round, expected: dict[int, dict[bytes, float]], target: int) -> None:
    panel = current.panel
    for member in range(POPULATION):
        replicas = expected.get(member, {})
        assert (member in current.settled) == redundancy.settled(replicas, target, 0.0, panel.referees, member in panel.spot), member
