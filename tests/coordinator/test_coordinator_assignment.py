"""Pure coordinator rules: assignment, re-assignment, redundancy verdicts, lifecycle and close."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmtune import assignment, batches, entries, identity, shaping
from swarmtune.assignment import Candidate, assign, by_worker, effective_replicas, picks, quotas
from swarmtune.coordinator.close import Accepted, build_iteration, retention_alerts
from swarmtune.coordinator.lifecycle import OpenIteration, encode_open_meta, extend_deadline, may_close, open_iteration, quorum_members, resume_iteration
from swarmtune.redundancy import judge, settled, strikes, to_revoke, wanted
from swarmtune.batches import Batch
from swarmtune.entries import RetentionReport
from swarmtune.coordinator.round import Round
from swarmtune.jobspec import JobSpec, parse_job_spec
from swarmtune.seeds import population

SPEC = b'[job]\nid = "pure"\nmodel = "builtin:tiny"\nseed = 3\n[task]\nname = "countdown"\n[es]\npopulation = 6\n'


def k(n: int) -> bytes:
    return bytes([n]) * 32


def candidates(*specs: tuple[int, str, int]) -> list[Candidate]:
    return [Candidate(k(n), operator, capacity) for n, operator, capacity in specs]


def holders_of(plan: dict[bytes, tuple[int, ...]]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for key, members in plan.items():
        for m in members:
            out.setdefault(m, []).append(key)
    return out


def test_quotas_follow_capacity_up_to_it() -> None:
    assert quotas(30, [10, 20, 30]) == [5, 10, 15]
    assert quotas(10, [5, 5, 5]) == [4, 3, 3]  # largest remainder, ties to the earlier worker
    assert quotas(3, [0, 0]) == [0, 0]
    assert quotas(50, [4, 2]) == [4, 2]  # never beyond capacity
    assert quotas(15, [40, 1, 1], cap=5) == [5, 1, 1]  # so does the population (a member once per worker)


def test_capacity_weighted_single_replica() -> None:
    plan = assign(list(range(30)), candidates((1, "a", 10), (2, "b", 20), (3, "c", 30)), replicas=1)
    assert sorted(len(v) for v in plan.values()) == [5, 10, 15]
    assert sorted(m for v in plan.values() for m in v) == list(range(30))


def test_capacity_is_a_cap_and_the_rest_waits() -> None:
    plan = assign(list(range(30)), candidates((1, "a", 1), (2, "b", 2), (3, "c", 3)), replicas=1)
    assert sorted(len(v) for v in plan.values()) == [1, 2, 3]


def test_replicas_on_distinct_workers_and_operators() -> None:
    pool = candidates((1, "a", 6), (2, "a", 6), (3, "b", 6), (4, "c", 6))
    plan = assign(list(range(12)), pool, replicas=2)
    operator = {c.key: c.operator for c in pool}
    for member, keys in holders_of(plan).items():
        assert len(keys) == 2, member
        assert len({operator[key] for key in keys}) == 2, member


def test_members_are_dealt_in_contiguous_blocks() -> None:
    # One replica: each worker's members are consecutive, so its batch's member gaps are one byte.
    plan = assign(list(range(30)), candidates((1, "a", 10), (2, "b", 20), (3, "c", 30)), replicas=1, draw=b"x" * 64)
    assert all(list(held) == list(range(held[0], held[-1] + 1)) for held in plan.values())
    assert sorted(m for held in plan.values() for m in held) == list(range(30))
    # Two replicas: a block that crosses into the second round wraps to the first members.
    plan = assign(list(range(12)), candidates(*[(n, str(n), 5) for n in range(5)]), replicas=2, draw=b"y" * 64)
    runs = {key: sum(1 for a, b in zip(held, held[1:]) if b != a + 1) + 1 for key, held in plan.items()}
    assert max(runs.values()) <= 2 and all(len(keys) == 2 for keys in holders_of(plan).values())


def test_replicas_capped_by_distinct_operators() -> None:
    pool = candidates((1, "a", 4), (2, "a", 4))
    assert effective_replicas(3, pool) == 1
    plan = assign(list(range(4)), pool, replicas=3)
    assert all(len(keys) == 1 for keys in holders_of(plan).values())


def test_draws_give_surplus_workers_turns() -> None:
    pool = candidates(*[(n, str(n), 1) for n in range(10)])
    used = Counter(key for t in range(40) for key in assign([0, 1], pool, 1, draw=bytes([t]) * 64))
    assert len(used) == 10 and max(used.values()) < 20


def test_every_slot_is_filled_where_the_greedy_pass_leaves_one() -> None:
    # The greedy deal (where contiguous blocks would give two workers of one operator a member) is
    # member-major: it gives members 0 and 1 to workers 2 and 0 first; member 2 would then be left
    # to worker 2, which holds it already: member 1 moves to worker 2 and worker 0 takes member 2.
    pool = candidates((0, "a", 2), (1, "b", 1), (2, "c", 3))
    taken = assignment._greedy([0, 1, 2], [2, 1, 3], pool, 2)
    assert Counter(p for holders in taken.values() for p in holders) == {0: 2, 1: 1, 2: 3}
    assert all(len(set(holders)) == 2 for holders in taken.values())


def test_blocks_that_would_give_one_operator_a_member_twice_fall_back_to_the_greedy_deal() -> None:
    pool = candidates((1, "a", 2), (2, "a", 2), (3, "b", 2), (4, "c", 2))
    clashing = [t for t in range(64) if assignment._operators_clash(assignment._spans(4, [2] * 4), assignment.drawn(pool, bytes([t]) * 64), 4)]
    assert clashing  # some draws order the two workers of "a" so that their blocks overlap
    plan = assign(list(range(4)), pool, 2, bytes([clashing[0]]) * 64)
    operator = {c.key: c.operator for c in pool}
    assert all(len(keys) == 2 and len({operator[key] for key in keys}) == 2 for keys in holders_of(plan).values())


@settings(max_examples=300, deadline=None)
@given(
    members=st.integers(1, 40),
    replicas=st.integers(1, 3),
    workers=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=8),
    draw=st.binary(min_size=64, max_size=64),
)
def test_assignment_invariants(members: int, replicas: int, workers: list[tuple[int, int]], draw: bytes) -> None:
    pool = [Candidate(k(i), f"op{op}", cap) for i, (op, cap) in enumerate(workers)]
    plan = assign(list(range(members)), pool, replicas, draw)
    operator = {c.key: c.operator for c in pool}
    want = effective_replicas(replicas, pool)
    holders = holders_of(plan)
    assert all(len(plan.get(c.key, ())) <= c.capacity for c in pool)
    for keys in holders.values():
        assert len(keys) <= want and len({operator[key] for key in keys}) == len(keys)
    if len(operator.values()) == len(set(operator.values())):  # one worker per operator
        slots = min(members * want, sum(min(c.capacity, members) for c in pool))
        assert sum(map(len, holders.values())) == slots


def test_reassign_avoids_holders_and_their_operators_within_capacity() -> None:
    pool = candidates((1, "a", 2), (2, "b", 2), (3, "b", 2), (4, "c", 1))
    holders = {0: frozenset({k(1)}), 1: frozenset({k(2)}), 2: frozenset({k(2)})}
    for t in range(20):
        plan = by_worker(picks({0: 1, 1: 1, 2: 1}, holders, pool, load={k(1): 0, k(2): 0, k(3): 0, k(4): 0}, draw=bytes([t]) * 64))
        got = holders_of(plan)
        assert got[0][0] != k(1)
        assert got[1][0] not in (k(2), k(3)) and got[2][0] not in (k(2), k(3))  # same operator as the holder
        assert len(plan.get(k(4), ())) <= 1  # its capacity


def test_reassign_skips_members_nobody_can_take() -> None:
    pool = candidates((1, "a", 2))
    assert picks({0: 1}, {0: frozenset({k(1)})}, pool, {}) == ()


def test_judge_median_majority() -> None:
    assert judge({k(1): 0.5}, 1e-6).reward == 0.5
    disputed = judge({k(1): 0.5, k(2): 0.9}, 1e-6)
    assert disputed.reward is None and not disputed.dissenters
    verdict = judge({k(1): 0.5, k(2): 0.9, k(3): 0.5}, 1e-6)
    assert verdict.reward == 0.5 and verdict.dissenters == {k(2)}
    assert judge({k(1): 0.5, k(2): 0.5000001}, 1e-6).reward == 0.5
    low = judge({k(1): 0.1, k(2): 0.5, k(3): 0.5}, 1e-6)
    assert low.reward == 0.5 and low.dissenters == {k(1)}


def test_settled_and_wanted_escalate_disputes() -> None:
    assert not settled({k(1): 0.5}, 2, 1e-6) and wanted({k(1): 0.5}, 2, 1e-6) == 2
    pair = {k(1): 0.5, k(2): 0.9}
    assert not settled(pair, 2, 1e-6) and wanted(pair, 2, 1e-6) == 3
    assert settled({**pair, k(3): 0.5}, 2, 1e-6)


def test_strikes_and_revocation_threshold() -> None:
    verdicts = [judge({k(1): 0.5, k(2): 0.9, k(3): 0.5}, 0.0), judge({k(1): 0.4, k(2): 0.0, k(3): 0.4}, 0.0)]
    counts = strikes(verdicts)
    assert counts == Counter({k(2): 2})
    assert to_revoke(counts, 2, frozenset()) == [k(2)]
    assert to_revoke(counts, 2, frozenset({k(2)})) == []
    assert to_revoke(counts, 3, frozenset()) == []


def test_lifecycle_seeds_deadline_quorum() -> None:
    spec = parse_job_spec(SPEC)
    opened = open_iteration(spec, 4, b"h" * 32, now_ms=1000)
    assert opened.plan.members(opened.iteration) == population(3, 4, 6, False)
    assert opened.deadline_ms == 1000 + 600_000 and opened.straggle_ms == 1000 + 300_000
    extended = extend_deadline(opened, spec, now_ms=700_000)
    assert extended.deadline_ms == 1_300_000 and extended.straggle_ms == 700_000
    resumed = resume_iteration(spec, encode_open_meta(opened), now_ms=5000)
    assert (resumed.iteration, resumed.head_hash, resumed.opened_ms, resumed.plan) == (4, b"h" * 32, 1000, opened.plan)
    assert resumed.deadline_ms == 605_000
    assert quorum_members(parse_job_spec(SPEC.replace(b"population = 6", b"population = 30") + b"[schedule]\nquorum = 0.9\n")) == 27
    assert may_close(spec, 6, now_ms=0, deadline_ms=10) and not may_close(spec, 5, now_ms=20, deadline_ms=10)
    half = parse_job_spec(SPEC + b"[schedule]\nquorum = 0.5\n")
    assert may_close(half, 3, now_ms=20, deadline_ms=10) and not may_close(half, 3, now_ms=0, deadline_ms=10)


def signed_batch(key: object, opened: object, members: list[int], rewards: list[float]) -> Batch:
    return batches.sign_batch(key, "pure", opened.iteration, opened.head_hash, members, rewards)  # type: ignore[arg-type,attr-defined]


def taken(spec: JobSpec, opened: OpenIteration, *signed: Batch) -> Accepted:
    """Every member of these batches, as a round that accepted them holds them."""
    current = Round(opened, spec.redundancy, spec.redundancy_tolerance)
    for batch in signed:
        current.accept(batch, batch.members)
    return current.accepted()


def test_build_iteration_shapes_settled_rewards_in_member_order() -> None:
    spec = parse_job_spec(SPEC + b"[schedule]\nredundancy = 2\n")
    opened = open_iteration(spec, 1, b"h" * 32, 0)
    a, b, c = (identity.generate_key() for _ in range(3))
    accepted = taken(
        spec,
        opened,
        signed_batch(a, opened, list(range(6)), [m / 10 for m in range(6)]),
        signed_batch(b, opened, list(range(5)), [m / 10 for m in range(5)]),  # member 5: one replica only
        signed_batch(c, opened, [0, 4], [0.9, 0.0]),  # member 0: b and a agree, c dissents; member 4: a, b agree on 0.4
    )
    closing = build_iteration(spec, opened, accepted, revoked=frozenset())
    body = closing.body
    assert body.rewards == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    assert body.disputed == (0.0, 0.4)  # the members whose replicas differ
    assert body.coefficients == tuple(shaping.coefficients([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "zscore", spec.alpha))
    assert strikes(closing.verdicts.values())[identity.public_key_bytes(c)] == 2
    assert len(body.batches) == 3 and all(not r.excluded for r in body.batches) and len(body.results) == 6 + 5 + 2


def test_build_iteration_leaves_out_revoked_and_unresolved() -> None:
    spec = parse_job_spec(SPEC)
    opened = open_iteration(spec, 1, b"h" * 32, 0)
    a, b, liar = (identity.generate_key() for _ in range(3))
    accepted = taken(
        spec,
        opened,
        signed_batch(a, opened, [0, 1, 2, 3], [0.5 + m / 100 for m in range(4)]),
        signed_batch(b, opened, [3], [0.9]),  # member 3: two replicas that disagree
        signed_batch(liar, opened, [4], [1.0]),
    )
    closing = build_iteration(spec, opened, accepted, revoked=frozenset({identity.public_key_bytes(liar)}))
    body = closing.body
    assert [r.member for r in body.results] == [0, 1, 2]
    assert [(r.batch.worker_key, r.excluded) for r in body.batches] == [(identity.public_key_bytes(a), (3,))]
    assert body.coefficients[3:] == (0, 0, 0) and body.rewards[3:] == (0.0, 0.0, 0.0)
    assert body.coefficients[:3] == tuple(shaping.coefficients([0.5, 0.51, 0.52], "zscore", spec.alpha))


def test_retention_alerts_against_first_value() -> None:
    key = identity.generate_key()

    def report(value: float) -> entries.Signed[RetentionReport]:
        record = RetentionReport("pure", 1, b"h" * 32, identity.public_key_bytes(key), (("probe", value),))
        return entries.sign_record(key, record)

    alerts, baselines = retention_alerts([report(0.9)], {}, 0.1)
    assert alerts == () and baselines == {"probe": 0.9}
    alerts, _ = retention_alerts([report(0.85)], baselines, 0.1)
    assert alerts == ()
    alerts, _ = retention_alerts([report(0.7)], baselines, 0.1)
    assert alerts and "probe fell from 0.9000 to 0.7000" in alerts[0]
    assert retention_alerts([report(0.1)], baselines, 0.0)[0] == ()


@pytest.mark.parametrize("capacity", [1, 3])
def test_assignment_is_deterministic(capacity: int) -> None:
    pool = candidates((1, "a", capacity), (2, "b", capacity), (3, "c", capacity))
    assert assign(list(range(9)), pool, 2, b"d" * 64) == assign(list(range(9)), pool, 2, b"d" * 64)
