"""The assignment record of an iteration entry: its form (ledger check) and its re-derivation (audit)."""

from __future__ import annotations

from dataclasses import replace

from swarmtune import assignlog, draw, ledger
from swarmtune.assignlog import DISPUTE, SPOT_CHECK, STRAGGLER, UNASSIGNED, Given
from swarmtune.assignment import first_ranked
from swarmtune.batches import Recorded
from swarmtune.client.judging import Judging
from swarmtune.entries import Assignment, Iteration
from swarmtune.jobspec import parse_job_spec
from tests.support.ledger_factory import ChainBuilder

SPEC = parse_job_spec(b'[job]\nid = "pure"\nmodel = "builtin:tiny"\nseed = 3\n[task]\nname = "countdown"\n[es]\npopulation = 4\n')


def straggled(chain: ChainBuilder) -> tuple[Iteration, int, bytes]:
    """Workers 0 and 1 open with two members each; one member of the first is taken by worker 2, a late
    joiner, which answers it while its first holder never does. Returns (entry, member, first holder)."""
    body = chain.iteration()
    drawn = draw.make_draw(chain.coordinator, chain.job_id, body.iteration, body.opened_head)
    candidates = tuple(draw.keyed_order(drawn, [chain.key(0), chain.key(1)]))
    body = replace(body, draw=drawn, candidates=candidates, capacities=(2, 2))
    opening = assignlog.initial(body, SPEC.redundancy)
    slow = candidates[0]
    member = opening[slow][0]
    late = chain.key(2)
    others, assignments = assignlog.encode([Given(member, late, frozenset({late}), STRAGGLER)], candidates)
    signers = {chain.key(i): w for i, w in enumerate(chain.workers)}
    shares = {**{key: [m for m in held if m != member] for key, held in opening.items()}, late: [member]}
    rewards = [0.25 * m for m in range(4)]
    recorded = tuple(
        Recorded(chain.batch(signers[key], body.iteration, share, body.opened_head, [rewards[m] for m in share]))
        for key, share in sorted(shares.items())
    )
    return replace(body, batches=recorded, others=others, assignments=assignments), member, slow


def audit_problem(body: Iteration) -> str | None:
    return Judging().problem(body, SPEC)


def verified(chain: ChainBuilder, body: Iteration) -> str | None:
    chain.add(body)
    report = ledger.verify_chain(chain.stored)
    return None if report.ok else report.problem.message  # type: ignore[union-attr]


def test_a_recorded_straggler_passes_the_ledger_check_and_the_audit() -> None:
    chain = ChainBuilder()
    body, _, _ = straggled(chain)
    assert audit_problem(body) is None
    assert verified(chain, body) is None


def test_an_assignment_the_draw_does_not_rank_first_is_reported() -> None:
    chain = ChainBuilder()
    body, member, slow = straggled(chain)
    late = chain.key(2)
    other = next(key for key in body.candidates if key != slow)
    preferred = first_ranked(body.draw, member, (late, other))
    steered = late if preferred == other else other
    # The coordinator claims both were eligible but hands the member to the one the draw ranks second.
    others, assignments = assignlog.encode([Given(member, steered, frozenset({late, other}), STRAGGLER)], body.candidates)
    tampered = replace(body, others=others, assignments=assignments)
    assert "the draw ranks" in (audit_problem(tampered) or "")


def test_a_wrong_reason_is_reported() -> None:
    chain = ChainBuilder()
    body, member, _ = straggled(chain)
    late = chain.key(2)
    for reason, why in ((UNASSIGNED, "unassigned, but it had 1 holders"), (DISPUTE, "counted replicas agree"), (SPOT_CHECK, "spot-check")):
        others, assignments = assignlog.encode([Given(member, late, frozenset({late}), reason)], body.candidates)
        assert why in (audit_problem(replace(body, others=others, assignments=assignments)) or ""), reason


def test_a_straggler_whose_holders_all_delivered_is_reported() -> None:
    chain = ChainBuilder()
    body, member, slow = straggled(chain)
    signer = chain.workers[[chain.key(i) for i in range(3)].index(slow)]
    answered = Recorded(chain.batch(signer, body.iteration, [member], body.opened_head, [0.25 * member]))
    # Member rewards agree (0.25 * member from both), so nobody was owed it.
    assert "every holder's replica is counted" in (audit_problem(replace(body, batches=(*body.batches, answered))) or "")


def test_an_uncovered_member_is_reported() -> None:
    chain = ChainBuilder()
    body, member, _ = straggled(chain)
    uncovered = replace(body, others=(), assignments=())
    assert f"member {member}: the counted replica of worker" in (audit_problem(uncovered) or "")


def test_the_ledger_check_rejects_malformed_assignments() -> None:
    bad = {
        "not a known reason code": lambda a: replace(a, reason=9),
        "beyond the population": lambda a: replace(a, member=4),
        "not among the eligible": lambda a: replace(a, worker=0),
        "bitmap is not 3 bits": lambda a: replace(a, eligible=b"\xff"),
    }
    for why, change in bad.items():
        chain = ChainBuilder()
        body, _, _ = straggled(chain)
        tampered: tuple[Assignment, ...] = (change(body.assignments[0]),)
        assert why in (verified(chain, replace(body, assignments=tampered)) or ""), why
    chain = ChainBuilder()
    body, _, _ = straggled(chain)
    assert "capacities recorded" in (verified(chain, replace(body, capacities=(2,))) or "")
    chain = ChainBuilder()
    body, _, _ = straggled(chain)
    assert "first candidate of its operator" in (verified(chain, replace(body, operators=(1, 1))) or "")


def test_the_encoding_round_trips_and_stays_small() -> None:
    keys = [bytes([i]) * 32 for i in range(10)]
    given = [Given(3, keys[9], frozenset({keys[8], keys[9]}), STRAGGLER), Given(1, keys[0], frozenset({keys[0]}), DISPUTE)]
    others, assignments = assignlog.encode(given, keys[:8])
    assert others == (keys[8], keys[9])  # workers outside the candidates, in first appearance
    assert assignlog.decode(keys[:8], others, assignments) == tuple(given)
    assert all(len(a.eligible) == 2 for a in assignments)  # 10 workers: two bytes of bitmap
    assert assignlog.operator_ranks(["a", "b", "c"]) == ()
    assert assignlog.operator_ranks(["a", "b", "a"]) == (0, 1, 0)
