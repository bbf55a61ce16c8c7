"""Byzantine rules: the draw, referee verdicts, spot checks, unsteerable extra replicas, the minority cap,
and what the ledger check and the audit re-derive of them."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import draw, identity, ledger
from swarmtune.client.judging import Judging, spot_checked, verdict_problem
from swarmtune.batches import Recorded
from swarmtune.entries import ROLE_REFEREE, Admission, Iteration, Revocation
from swarmtune.jobspec import parse_job_spec
from swarmtune.assignment import Candidate, by_worker, picks
from swarmtune.coordinator.close import dispute_alerts
from swarmtune.redundancy import (
    judge,
    needs_referee,
    revocation_reason,
    settled,
    strikes_named,
    wanted,
    within_minority,
)
from tests.support.ledger_factory import ChainBuilder


def k(n: int) -> bytes:
    return bytes([n]) * 32


REFEREE = k(9)


def test_the_draw_is_deterministic_verifiable_and_bound_to_its_iteration() -> None:
    key = identity.generate_key()
    public = identity.public_key_bytes(key)
    head = b"h" * 32
    drawn = draw.make_draw(key, "job", 3, head)
    assert drawn == draw.make_draw(key, "job", 3, head)  # Ed25519 is deterministic: nothing to grind
    assert draw.verify_draw(public, "job", 3, head, drawn)
    assert not draw.verify_draw(public, "job", 4, head, drawn)
    assert not draw.verify_draw(public, "job2", 3, head, drawn)
    assert not draw.verify_draw(identity.public_key_bytes(identity.generate_key()), "job", 3, head, drawn)
    # a result signature over the same bytes is no draw: the context separates them
    assert not draw.verify_draw(public, "job", 3, head, identity.sign(key, identity.CONTEXT_RESULT, draw.draw_message("job", 3, head)))


def test_keyed_order_is_a_permutation_that_changes_with_the_draw() -> None:
    keys = [k(n) for n in range(8)]
    orders = {tuple(draw.keyed_order(bytes([t]) * 64, keys)) for t in range(20)}
    assert all(sorted(order) == sorted(keys) for order in orders)
    assert len(orders) > 10
    assert draw.keyed_order(b"x" * 64, reversed(keys)) == draw.keyed_order(b"x" * 64, keys)  # input order does not matter


def test_spot_checks_hit_their_rate_and_nothing_at_zero() -> None:
    members = list(range(2000))
    assert draw.spot_checks(b"d" * 64, members, 0.0) == frozenset()
    assert draw.spot_checks(b"d" * 64, members, 1.0) == frozenset(members)
    hits = len(draw.spot_checks(b"d" * 64, members, 0.05))
    assert 60 <= hits <= 140  # 100 expected
    assert draw.spot_checks(b"d" * 64, members, 0.05) != draw.spot_checks(b"e" * 64, members, 0.05)


def test_a_referee_settles_the_member_and_only_disagreeing_with_it_strikes() -> None:
    referees = frozenset({REFEREE})
    # two colluding liars (0.9) against one honest worker (0.5): the referee sides with the truth
    verdict = judge({k(1): 0.9, k(2): 0.9, k(3): 0.5, REFEREE: 0.5}, 1e-6, referees)
    assert verdict.reward == 0.5 and verdict.dissenters == {k(1), k(2)}
    assert settled({k(1): 0.9, REFEREE: 0.5}, 2, 1e-6, referees)


def test_with_referees_untrusted_replicas_never_strike_each_other() -> None:
    referees = frozenset({REFEREE})
    disputed = judge({k(1): 0.9, k(2): 0.9, k(3): 0.5}, 1e-6, referees)
    assert disputed.reward is None and not disputed.dissenters  # a majority of liars decides nothing
    agreed = judge({k(1): 0.5, k(2): 0.5}, 1e-6, referees)
    assert agreed.reward == 0.5 and not agreed.dissenters
    spot = judge({k(1): 0.5, k(2): 0.5}, 1e-6, referees, spot=True)
    assert spot.reward is None  # a spot-checked member waits for its referee
    assert not settled({k(1): 0.5, k(2): 0.5}, 2, 1e-6, referees, spot=True)


def test_who_needs_a_referee_and_how_many_untrusted_replicas() -> None:
    referees = frozenset({REFEREE})
    assert needs_referee({k(1): 0.9, k(2): 0.5}, 1e-6, referees, spot=False)
    assert not needs_referee({k(1): 0.5, k(2): 0.5}, 1e-6, referees, spot=False)
    assert needs_referee({}, 1e-6, referees, spot=True)
    assert not needs_referee({k(1): 0.9, REFEREE: 0.5}, 1e-6, referees, spot=True)
    assert not needs_referee({k(1): 0.9, k(2): 0.5}, 1e-6, frozenset(), spot=True)
    # a dispute asks a referee, not a third untrusted replica; without referees, a third replica
    assert wanted({k(1): 0.9, k(2): 0.5}, 2, 1e-6, referees) == 2
    assert wanted({k(1): 0.9, k(2): 0.5}, 2, 1e-6) == 3


def test_without_referees_a_close_revokes_only_a_minority_of_operators() -> None:
    operators = {k(n): f"op{n}" for n in range(5)}
    assert within_minority([k(0), k(1)], operators)
    assert not within_minority([k(0), k(1), k(2)], operators)
    # two keys of one operator count once, on both sides
    shared = {**operators, k(5): "op0"}
    assert within_minority([k(0), k(5), k(1)], shared)
    assert not within_minority([k(0), k(5), k(1), k(2)], shared)


def test_disputes_without_referees_raise_an_alert() -> None:
    disputed = {0: judge({k(1): 0.5, k(2): 0.5, k(3): 0.9}, 1e-6), 1: judge({k(1): 0.5}, 1e-6)}
    alerts = dispute_alerts(disputed, frozenset())
    assert len(alerts) == 1 and "[0]" in alerts[0] and "--referee" in alerts[0]
    assert dispute_alerts(disputed, frozenset({REFEREE})) == ()


def test_revocation_reasons_name_their_strikes_for_either_judge() -> None:
    assert strikes_named(revocation_reason(3, 2)) == 3
    assert strikes_named(revocation_reason(4, 2, refereed=True)) == 4
    assert strikes_named("revoked by hand") is None


def test_an_idle_fast_worker_gets_no_more_extra_replicas_than_its_share() -> None:
    # Worker 1 answered everything at once (load 0); workers 2-5 still owe members. Extra opinions on
    # disputed members are drawn, not handed to whoever is idle.
    pool = [Candidate(k(n), f"op{n}", 2) for n in range(1, 6)]
    load = {k(1): 0, k(2): 2, k(3): 2, k(4): 2, k(5): 2}
    got: Counter[bytes] = Counter()
    for t in range(200):
        holders = {0: frozenset({k(2), k(3)})}
        plan = by_worker(picks({0: 1}, holders, pool, load, draw=bytes([t % 256, t // 256]) * 32, disputed={0}))
        got.update(list(plan))
    assert set(got) == {k(1), k(4), k(5)} and max(got.values()) < 100  # ~67 each


def test_first_replicas_still_respect_capacity() -> None:
    pool = [Candidate(k(1), "a", 1), Candidate(k(2), "b", 1)]
    plan = by_worker(picks({0: 1, 1: 1, 2: 1}, {}, pool, {k(1): 1, k(2): 0}, draw=b"z" * 64))
    assert plan == {k(2): (0,)}


# ---- what the ledger and the audit check ---------------------------------------------------------

SPEC = b'[job]\nid = "pure"\nmodel = "builtin:tiny"\nseed = 3\n[task]\nname = "countdown"\n[es]\npopulation = 4\n[schedule]\nrevoke_after = 2\nspot_check = 0.5\n'


def drawn_iteration(chain: ChainBuilder, key: Ed25519PrivateKey | None = None) -> Iteration:
    body = chain.iteration()
    drawn = draw.make_draw(key or chain.coordinator, chain.job_id, body.iteration, body.opened_head)
    return replace(body, draw=drawn, candidates=tuple(draw.keyed_order(drawn, (chain.key(i) for i in range(3)))), capacities=(1, 1, 1))


def problem_of(chain: ChainBuilder) -> str | None:
    report = ledger.verify_chain(chain.stored)
    return None if report.ok else report.problem.message  # type: ignore[union-attr]


def test_the_ledger_checks_the_draw_and_the_candidate_order() -> None:
    chain = ChainBuilder()
    chain.add(drawn_iteration(chain))
    assert problem_of(chain) is None
    forged = ChainBuilder()
    forged.add(drawn_iteration(forged, identity.generate_key()))
    assert "draw is not the coordinator's signature" in (problem_of(forged) or "")
    reordered = ChainBuilder()
    body = drawn_iteration(reordered)
    reordered.add(replace(body, candidates=tuple(reversed(body.candidates))))
    assert "order the draw implies" in (problem_of(reordered) or "")
    undrawn = ChainBuilder()
    undrawn.add(replace(undrawn.iteration(), candidates=(undrawn.key(0),)))
    assert "without a draw" in (problem_of(undrawn) or "")


def test_an_admitted_key_may_be_promoted_to_referee_once() -> None:
    chain = ChainBuilder()
    chain.add(Admission(chain.key(0), "trusted", "", ROLE_REFEREE))
    assert problem_of(chain) is None
    chain.add(Admission(chain.key(0), "trusted", "", ROLE_REFEREE))
    assert "already admitted" in (problem_of(chain) or "")
    odd = ChainBuilder()
    odd.add(Admission(odd.key(0), "boss", "", "boss"))
    assert "role 'boss'" in (problem_of(odd) or "")


def test_the_audit_rederives_a_refereed_reward() -> None:
    spec = parse_job_spec(SPEC)
    chain = ChainBuilder()
    referee, liar, other = chain.workers
    body = chain.iteration()
    recorded = tuple(Recorded(chain.batch(w, 1, [0], body.opened_head, [r])) for w, r in ((referee, 0.5), (liar, 0.9), (other, 0.9)))
    referees = frozenset({chain.key(0)})
    honest = replace(body, plan=replace(body.plan, population=1, antithetic=False), batches=recorded, disputed=(0.5,), coefficients=(0,))
    assert verdict_problem(honest, spec, referees) is None
    outvoted = replace(honest, disputed=(0.9,))
    assert "settle on 0.5" in (verdict_problem(outvoted, spec, referees) or "")
    judging = Judging()
    judging.problem(Admission(chain.key(0), "trusted", "", ROLE_REFEREE), spec)
    assert judging.problem(honest, spec) is None and judging.strikes == {chain.key(1): 1, chain.key(2): 1}
    assert judging.problem(Revocation(chain.key(1), revocation_reason(2, 2, refereed=True), ""), spec) is None
    assert "does not match" in (judging.problem(Revocation(chain.key(2), revocation_reason(2, 2), ""), spec) or "")
    assert "threshold is 2" in (judging.problem(Revocation(chain.key(0), revocation_reason(1, 2, refereed=True), ""), spec) or "")


def test_spot_checks_are_rederived_from_the_draw() -> None:
    spec = parse_job_spec(SPEC)
    chain = ChainBuilder()
    body = drawn_iteration(chain)
    members = list(range(body.plan.population))
    referees = frozenset({chain.key(0)})
    assert spot_checked(body, spec, referees) == draw.spot_checks(body.draw, members, 0.5)
    assert spot_checked(body, spec, frozenset()) == frozenset()
    every = parse_job_spec(SPEC.replace(b"spot_check = 0.5", b"spot_check = 1.0"))
    # a spot-checked member recorded without its referee's answer is flagged
    assert "spot check no referee answered" in (verdict_problem(body, every, referees) or "")
