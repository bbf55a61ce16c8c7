"""The close builds the same entry bytes as the implementation it replaced (goldens recorded from
swarmtune 0.2.0 at 8202321, which judged every member from a list of results), under majority rule
and under referees: disputes, an unsettled member excluded from two batches, a worker with two
batches, a revoked worker's replica, later assignments naming a worker outside the candidates."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import assignlog, batches, entries, identity
from swarmtune.assignlog import Given
from swarmtune.batches import Batch
from swarmtune.coordinator.close import Panel, build_iteration
from swarmtune.coordinator.lifecycle import OpenIteration, open_iteration
from swarmtune.coordinator.round import Round
from swarmtune.jobspec import JobSpec, parse_job_spec

SPEC = b'[job]\nid = "pure"\nmodel = "builtin:tiny"\nseed = 3\n[task]\nname = "countdown"\n[es]\npopulation = 12\n[schedule]\nredundancy = 2\n'
MAJORITY = (1107, "26173cecb0baf72ce226024332dfd2eaeceec0e727c722b8143fbceefb256d99")
REFEREED = (1014, "e473b0968bcc86e9951ebbba428f462860ee00e84c5a343c2e0ec93df2a13ede")


def key(n: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)


def pub(n: int) -> bytes:
    return identity.public_key_bytes(key(n))


def scenario() -> tuple[JobSpec, OpenIteration, list[Batch], Panel, tuple[Given, ...]]:
    """Workers 1-4 are the candidates, 5 takes members later, 6 is revoked at this close."""
    spec = parse_job_spec(SPEC)
    opened = open_iteration(spec, 4, bytes(range(32)), 0)

    def sign(n: int, members: list[int], rewards: list[float]) -> Batch:
        return batches.sign_batch(key(n), "pure", 4, opened.head_hash, members, rewards)

    signed = [
        sign(1, list(range(6)), [m / 10 for m in range(6)]),
        sign(2, list(range(5)), [m / 10 for m in range(5)]),
        sign(3, [0, 4], [0.9, 0.0]),  # dissents on members 0 and 4
        sign(4, [6, 7], [0.6, 0.7]),
        sign(4, [8, 9, 10], [0.8, 0.9, 1.0]),
        sign(5, [6, 11], [0.95, 0.3]),  # member 6: two replicas that do not settle
        sign(6, [9], [5.0]),
    ]
    panel = Panel(draw=bytes(range(64)), candidates=tuple(pub(n) for n in (3, 1, 4, 2)), capacities=(4, 6, 5, 6))
    given = (
        Given(11, pub(5), frozenset({pub(5), pub(1)}), assignlog.UNASSIGNED),
        Given(6, pub(5), frozenset({pub(5), pub(2), pub(6)}), assignlog.STRAGGLER),
    )
    return spec, opened, signed, panel, given


def sealed_close(panel_changes: dict[str, object]) -> tuple[bytes, entries.Iteration, set[int]]:
    spec, opened, signed, panel, given = scenario()
    current = Round(opened, spec.redundancy, spec.redundancy_tolerance)
    for batch in signed:
        current.accept(batch, batch.members)
    closing = build_iteration(spec, opened, current.accepted(), frozenset({pub(6)}), (), (), replace(panel, **panel_changes), given)  # type: ignore[arg-type]
    stored = entries.seal(key(99), entries.Entry(9, bytes(range(32, 64)), "pure", 1234, closing.body))
    return stored, closing.body, set(closing.verdicts)


def test_majority_rule_close_is_byte_identical_to_the_recorded_golden() -> None:
    stored, body, judged = sealed_close({})
    assert (len(stored), hashlib.sha256(stored).hexdigest()) == MAJORITY
    assert body.disputed == (0.0, 0.4)
    assert [(r.batch.members, r.excluded) for r in body.batches if 6 in r.batch.members] == [((6, 7), (6,)), ((6, 11), (6,))]
    assert pub(6) not in {r.batch.worker_key for r in body.batches}
    # Only members with several replicas are judged; a lone replica stands (member 9: the revoked one's left out).
    assert judged == {0, 1, 2, 3, 4} and body.rewards[9] == 0.9


def test_refereed_close_is_byte_identical_to_the_recorded_golden() -> None:
    stored, _, judged = sealed_close({"referees": frozenset({pub(2)}), "spot": frozenset({3, 11})})
    assert (len(stored), hashlib.sha256(stored).hexdigest()) == REFEREED
    assert 11 not in judged and {0, 3, 5} <= judged  # a spot check no referee answered does not stand


def test_a_withdrawn_batch_leaves_no_trace_in_the_entry() -> None:
    """A batch whose journal write failed is withdrawn: the close is the one of a round that never took it."""
    spec, opened, signed, panel, given = scenario()

    def closed(batches_taken: list[Batch], withdrawn: Batch | None) -> bytes:
        current = Round(opened, spec.redundancy, spec.redundancy_tolerance)
        for batch in batches_taken:
            current.accept(batch, batch.members)
        if withdrawn is not None:
            current.withdraw(withdrawn, withdrawn.members)
        closing = build_iteration(spec, opened, current.accepted(), frozenset({pub(6)}), (), (), panel, given)
        return entries.seal(key(99), entries.Entry(9, bytes(range(32, 64)), "pure", 1234, closing.body))

    late = signed[5]  # worker 5's: member 6 then settles on worker 4's lone replica
    assert closed(signed, late) == closed([b for b in signed if b is not late], None)
    assert entries.parse_entry(closed(signed, late)).entry.body.rewards[6] == 0.6  # type: ignore[union-attr]
