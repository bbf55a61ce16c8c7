"""Ledger verification: a sound ledger passes; each kind of tampering is caught at its entry."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from swarmtune import batches, coefficients, entries, identity, ledger, precheck, shaping
from swarmtune.batches import Recorded
from swarmtune.entries import Admission, Checkpoint, Iteration, Revocation
from swarmtune.wire import ledger_pb2 as pb
from tests.support.ledger_factory import BASE_STATE, ChainBuilder, sound_chain
from tests.support.replay_ledger import build_ledger
from tests.support.tiny_models import tiny_llama


def _problem(stored: list[bytes], **kwargs: object) -> ledger.Problem:
    # Results checked ahead on other threads change nothing: the same first problem, the same report.
    report, threaded = (ledger.verify_chain(stored, threads=n, **kwargs) for n in (1, 4))  # type: ignore[arg-type]
    assert report == threaded
    assert not report.ok, "verification passed a ledger it should have failed"
    assert report.problem is not None
    return report.problem


def _expect(stored: list[bytes], index: int | None, kind: str, fragment: str) -> None:
    problem = _problem(stored)
    assert (problem.index, problem.kind) == (index, kind), problem.describe()
    assert fragment in problem.message, problem.describe()


def _with_envelope(stored: bytes, edit: object) -> bytes:
    """Stored bytes whose envelope `edit` changed, keeping the original coordinator signature."""
    signed = pb.SignedEntry.FromString(stored)
    envelope = pb.Entry.FromString(signed.entry)
    edit(envelope)  # type: ignore[operator]
    return pb.SignedEntry(entry=envelope.SerializeToString(), signature=signed.signature).SerializeToString()


def _one_iteration(chain: ChainBuilder, **changes: object) -> list[bytes]:
    chain.add(chain.iteration(**changes))
    return chain.stored


def test_sound_ledger_verifies_and_counts_what_it_checked() -> None:
    chain = sound_chain(iterations=3)
    report = ledger.verify_chain(chain.stored, identity.public_key_bytes(chain.coordinator))
    assert report.ok, report.problem
    assert report == ledger.verify_chain(chain.stored, identity.public_key_bytes(chain.coordinator), threads=1)
    assert report.entries == len(chain.stored) and report.job_id == "job-test"
    assert report.head_hash == entries.parse_entry(chain.stored[-1]).hash
    kinds = {"genesis": 1, "iteration": 3, "admission": 1, "attestation": 1, "checkpoint": 1, "revocation": 1}
    assert report.kinds == kinds
    assert report.worker_signatures == 3 + 4 + 4 + 1 + 2  # one batch per worker and iteration, attestations
    assert report.to_json()["ok"] is True


def test_batches_checked_ahead_are_exactly_those_whose_signatures_verify() -> None:
    original, stored = _reward_edited_by_the_coordinator()
    with ThreadPoolExecutor(2) as pool:
        checked = precheck.checked_batches(map(precheck.parse, [*stored, b"not an entry"]), pool)
    recorded = entries.parse_entry(stored[1]).entry.body.batches  # type: ignore[union-attr]
    assert checked == {r.batch.signed for i, r in enumerate(recorded) if i != 1}  # batch 1 is forged
    assert original.batch.signed not in checked  # never recorded, so never checked
    mine = {recorded[0].batch.signed}
    with ThreadPoolExecutor(2) as pool:
        assert precheck.checked_batches(map(precheck.parse, stored), pool, skip=mine) == checked - mine  # a worker's own: not checked again


def test_a_forged_batch_among_many_is_caught_on_the_pool_too() -> None:
    chain = ChainBuilder(workers=3 * precheck.BATCH_CHUNK)
    honest = chain.iteration(members=2 * len(chain.workers))  # several chunks: checked on the pool
    forged = replace(honest.batches[20], batch=replace(honest.batches[20].batch, signature=bytes(64)))
    stored = _one_iteration(chain, members=honest.plan.population, batches=(*honest.batches[:20], forged, *honest.batches[21:]))
    with ThreadPoolExecutor(2) as pool:
        checked = precheck.checked_batches(map(precheck.parse, stored), pool)
    assert checked == {r.batch.signed for r in honest.batches} - {honest.batches[20].batch.signed}
    assert "batch 20: worker signature invalid" in _problem(stored).message


def test_a_walk_continued_from_where_another_stopped_agrees_with_whole_chain_verification() -> None:
    chain = sound_chain(iterations=2)
    state, _ = ledger.start(chain.stored[0])
    for part in (chain.stored[1:3], chain.stored[3:4], chain.stored[4:]):
        state, _ = list(ledger.walk(part, state))[-1]
    assert state.head_hash == ledger.verify_chain(chain.stored).head_hash
    assert state.last_iteration == 2 and identity.public_key_bytes(chain.workers[1]) in state.revoked


def test_reward_edited_in_place_breaks_the_coordinator_signature_at_that_entry() -> None:
    chain = sound_chain(iterations=3)
    k = 3

    def raise_reward(envelope: pb.Entry) -> None:
        envelope.iteration.batches[0].rewards = batches.pack_rewards([1e9])

    stored = list(chain.stored)
    stored[k] = _with_envelope(stored[k], raise_reward)
    _expect(stored, k, "iteration", "coordinator signature invalid")


def _reward_edited_by_the_coordinator() -> tuple[Recorded, list[bytes]]:
    """Worker 1's honest batch, and a ledger whose entry 1 records it with another reward under its signature."""
    chain = ChainBuilder()
    honest = chain.iteration()
    original = honest.batches[1]
    b = original.batch
    forged = Recorded(batches.parts(b.job_id, b.iteration, b.head_hash, b.worker_key, b.packed_members, batches.pack_rewards([1e9]), b.signature))
    return original, _one_iteration(chain, batches=(honest.batches[0], forged, *honest.batches[2:]))


def test_reward_edited_by_the_coordinator_breaks_the_worker_signature() -> None:
    _, stored = _reward_edited_by_the_coordinator()
    _expect(stored, 1, "iteration", "batch 1: worker signature invalid")


def test_a_worker_skips_only_its_own_exact_signatures() -> None:
    original, stored = _reward_edited_by_the_coordinator()
    state, _ = ledger.start(stored[0])
    mine = {original.batch.signed}  # what the worker signed: the reward it measured
    with pytest.raises(ledger.LedgerError, match="batch 1: worker signature invalid"):
        ledger.advance(state, stored[1], vouched=mine)  # its signature on other bytes counts for nothing
    # What it vouches for is taken as signed, byte for byte, and is not verified again.
    chain = ChainBuilder()
    first = chain.iteration()
    unchecked = replace(first.batches[1], batch=replace(first.batches[1].batch, signature=bytes(64)))
    stored = _one_iteration(chain, batches=(first.batches[0], unchecked, *first.batches[2:]))
    state, _ = ledger.start(stored[0])
    ledger.advance(state, stored[1], vouched={unchecked.batch.signed})
    with pytest.raises(ledger.LedgerError, match="batch 1: worker signature invalid"):
        ledger.advance(state, stored[1])


def _resealed(chain: ChainBuilder, stored: bytes, edit: object) -> bytes:
    """Stored bytes whose envelope `edit` changed, sealed again by the chain's coordinator."""
    envelope = pb.Entry.FromString(pb.SignedEntry.FromString(stored).entry)
    edit(envelope)  # type: ignore[operator]
    signature = identity.sign(chain.coordinator, identity.CONTEXT_ENTRY, envelope.SerializeToString())
    return pb.SignedEntry(entry=envelope.SerializeToString(), signature=signature).SerializeToString()


def test_a_recorded_batch_names_its_worker_by_index_and_the_key_is_in_the_entry_once() -> None:
    chain = ChainBuilder()
    body = chain.iteration(members=6)
    stored = _one_iteration(chain, members=6, batches=(*body.batches, Recorded(chain.batch(chain.workers[0], 1, [4], chain.head.hash, [0.0]))))
    message = pb.Entry.FromString(pb.SignedEntry.FromString(stored[1]).entry).iteration
    # Indices 0, 1, 2, 0: each a step from the previous batch's, 0 when it is the next worker's.
    assert [b.worker_delta for b in message.batches] == [0, 0, 0, -3] and list(message.others) == [chain.key(w) for w in range(3)]
    assert all(chain.key(0) not in b.SerializeToString() for b in message.batches)
    parsed = entries.parse_entry(stored[1]).entry.body
    assert [r.batch.worker_key for r in parsed.batches] == [chain.key(w) for w in (0, 1, 2, 0)]  # type: ignore[union-attr]
    assert ledger.verify_chain(stored).ok


def test_a_batch_index_that_names_another_worker_or_none_is_refused() -> None:
    chain = ChainBuilder()
    stored = _one_iteration(chain)

    def name_workers(*deltas: int) -> object:
        def edit(envelope: pb.Entry) -> None:
            for batch, delta in zip(envelope.iteration.batches, deltas):
                batch.worker_delta = delta

        return edit

    # Batches 0 and 1 recorded under each other's index: the key an index resolves to is the one the
    # signature must verify under.
    _expect([stored[0], _resealed(chain, stored[1], name_workers(1, -2, 1))], 1, "iteration", "batch 0: worker signature invalid")
    _expect([stored[0], _resealed(chain, stored[1], name_workers(0, 0, 1))], 1, "iteration", "batch 2: its worker index 3 is not among the entry's 3 workers")
    _expect([stored[0], _resealed(chain, stored[1], name_workers(-1))], 1, "iteration", "batch 0: its worker index -1 is not among")


def _disputed(chain: ChainBuilder, second_reward: float, disputed: tuple[float, ...]) -> Iteration:
    """The next iteration with a second replica of member 0 (worker 1's), of `second_reward`."""
    body = chain.iteration()
    extra = Recorded(chain.batch(chain.workers[1], body.iteration, [0], body.opened_head, [second_reward]))
    return replace(body, batches=(*body.batches, extra), disputed=disputed)


def test_a_disputed_member_settles_on_one_of_its_replicas_rewards() -> None:
    chain = ChainBuilder()
    first = chain.iteration().rewards[0]
    chain.add(_disputed(chain, 0.9, (first,)))
    assert ledger.verify_chain(chain.stored).ok
    assert entries.parse_entry(chain.stored[-1]).entry.body.rewards[0] == first  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("second", "disputed", "fragment"),
    [
        (0.9, (42.0,), "member 0's reward 42.0 is none of its results' rewards"),
        (0.9, (), "1 members' replicas differ but 0 disputed rewards are recorded"),
        (None, (0.5,), "0 members' replicas differ but 1 disputed rewards are recorded"),
    ],
)
def test_recorded_reward_not_from_a_result_is_caught(second: float | None, disputed: tuple[float, ...], fragment: str) -> None:
    chain = ChainBuilder()
    body = _disputed(chain, 0.9, disputed) if second is not None else replace(chain.iteration(), disputed=disputed)
    chain.add(body)
    _expect(chain.stored, 1, "iteration", fragment)


def test_swapped_signatures_are_caught_at_the_first_swapped_entry() -> None:
    stored = list(sound_chain(iterations=3).stored)
    a, b = pb.SignedEntry.FromString(stored[2]), pb.SignedEntry.FromString(stored[3])
    stored[2] = pb.SignedEntry(entry=a.entry, signature=b.signature).SerializeToString()
    stored[3] = pb.SignedEntry(entry=b.entry, signature=a.signature).SerializeToString()
    _expect(stored, 2, "admission", "coordinator signature invalid")


def test_deleted_entry_is_caught_where_it_is_missing() -> None:
    stored = list(sound_chain(iterations=3).stored)
    del stored[4]
    _expect(stored, 4, "attestation", "has index 5 at position 4")


def test_swapped_entries_are_caught_at_the_first_of_them() -> None:
    stored = list(sound_chain(iterations=3).stored)
    stored[3], stored[4] = stored[4], stored[3]
    _expect(stored, 3, "iteration", "has index 4 at position 3")


def test_entry_with_a_rewritten_prev_hash_is_caught() -> None:
    chain = sound_chain(iterations=3)
    entry = replace(entries.parse_entry(chain.stored[5]).entry, prev_hash=bytes(32))
    stored = list(chain.stored)
    stored[5] = entries.seal(chain.coordinator, entry)  # properly sealed, but not chained
    _expect(stored, 5, "attestation", "prev_hash is not the hash of entry 4")


def test_entry_sealed_by_another_coordinator_key_is_caught() -> None:
    chain = sound_chain(iterations=2)
    impostor = identity.generate_key()
    stored = list(chain.stored)
    stored[-1] = entries.seal(impostor, entries.parse_entry(stored[-1]).entry)
    _expect(stored, len(stored) - 1, "revocation", "coordinator signature invalid")


def test_result_from_an_unadmitted_worker_is_rejected() -> None:
    chain = ChainBuilder(workers=3, admitted=2)
    _expect(_one_iteration(chain, workers=chain.workers), 1, "iteration", "batch 2: worker")
    assert "is not admitted" in _problem(chain.stored).message


def test_result_from_a_revoked_worker_is_rejected() -> None:
    chain = ChainBuilder(workers=2)
    chain.add(chain.iteration())
    chain.add(Revocation(chain.key(1), "misbehaved", "op"))
    _expect(_one_iteration(chain, workers=chain.workers), 3, "iteration", "was revoked")


def test_worker_admitted_while_an_iteration_was_open_may_submit_to_it() -> None:
    chain = ChainBuilder(workers=3, admitted=2)
    opened = chain.iteration(workers=chain.workers)  # bound to the head before the admission
    chain.add(Admission(chain.key(2), "joined", "op-c"))
    chain.add(opened)
    assert ledger.verify_chain(chain.stored).ok


def test_revoked_key_cannot_be_admitted_again() -> None:
    chain = ChainBuilder(workers=2)
    chain.add(Revocation(chain.key(1), "leaked", "op"))
    chain.add(Admission(chain.key(1), "please", "op"))
    _expect(chain.stored, 2, "admission", "revoked keys stay revoked")


def test_revoking_an_unknown_key_is_refused() -> None:
    chain = ChainBuilder()
    chain.add(Revocation(identity.public_key_bytes(identity.generate_key()), "?", "op"))
    _expect(chain.stored, 1, "revocation", "is not admitted")


def _bad_batch(chain: ChainBuilder, **changes: object) -> Iteration:
    """The next iteration with worker 0's batch re-signed with `changes` to what it binds or holds."""
    body = chain.iteration()
    first = body.batches[0].batch
    values: dict[str, object] = dict(job_id=first.job_id, iteration=first.iteration, head_hash=first.head_hash, members=first.members, rewards=first.rewards)
    values.update(changes)
    resigned = batches.sign_batch(chain.workers[0], **values)  # type: ignore[arg-type]
    return replace(body, batches=(Recorded(resigned), *body.batches[1:]))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"members": [0, 77], "rewards": [0.5, 0.5]}, "member 77 is not in the iteration"),
        # What a batch is bound to is the entry's own: a batch signed for another is no signature of this one.
        ({"head_hash": bytes(32)}, "batch 0: worker signature invalid"),
        ({"job_id": "other-job"}, "batch 0: worker signature invalid"),
        ({"iteration": 5}, "batch 0: worker signature invalid"),
        ({"rewards": [math.nan, 0.5]}, "counts reward nan, which is not finite"),
    ],
)
def test_batch_not_bound_to_its_iteration_is_rejected(changes: dict[str, object], fragment: str) -> None:
    chain = ChainBuilder()
    chain.add(_bad_batch(chain, **changes))
    _expect(chain.stored, 1, "iteration", fragment)


def test_a_non_finite_reward_the_iteration_excludes_does_not_count() -> None:
    chain = ChainBuilder()
    body = _bad_batch(chain, rewards=[math.nan, 0.25 * ((1 + 3) % 5)])  # member 0's reward NaN, member 3's honest
    (first, *rest) = body.batches
    chain.add(replace(body, batches=(replace(first, excluded=(0,)), *rest), coefficients=(0, *body.coefficients[1:])))
    assert ledger.verify_chain(chain.stored).ok


def test_a_batch_cannot_exclude_members_it_does_not_hold() -> None:
    chain = ChainBuilder()
    body = chain.iteration()
    (first, *rest) = body.batches
    _expect(_one_iteration(chain, batches=(replace(first, excluded=(1,)), *rest)), 1, "iteration", "excludes members the batch does not hold")


def test_two_results_from_one_worker_for_one_member_are_refused() -> None:
    chain = ChainBuilder()
    body = chain.iteration()
    again = Recorded(chain.batch(chain.workers[0], body.iteration, [0], body.opened_head, [body.rewards[0]]))
    _expect(_one_iteration(chain, batches=(*body.batches, again)), 1, "iteration", "a second result from the same worker for member 0")


def test_an_entry_records_no_coefficients_and_the_walk_derives_them_from_the_rewards() -> None:
    stored = build_ledger(tiny_llama(hidden=16), iterations=2)
    walked = [entry.entry.body for _, entry in ledger.walk(stored)][1:]
    for data, body in zip(stored[1:], walked):
        assert isinstance(body, Iteration)
        assert entries.parse_entry(data).entry.body.coefficients == ()  # type: ignore[union-attr]
        # What the ledger builder's coordinator shaped: the spec's zscore, α = 5e-4, one group.
        assert body.coefficients == tuple(shaping.coefficients(body.rewards, "zscore", 5e-4))
    # A member without a counted result gets 0, and the others are shaped without it.
    chain = ChainBuilder()
    body = chain.iteration()
    (first, *rest) = body.batches  # worker 0's batch holds members 0 and 3
    entry = entries.parse_entry(_one_iteration(chain, batches=(replace(first, excluded=(3,)), *rest))[1])
    derived = coefficients.with_coefficients(entry, shaping.Rule("zscore", 5e-4, 4)).entry.body.coefficients  # type: ignore[union-attr]
    assert derived[3] == 0 and derived[:3] == tuple(shaping.coefficients(body.rewards[:3], "zscore", 5e-4))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"iteration": 2}, "iteration 2, expected 1"),
        ({"opened_head": bytes(32)}, "opened_head is not the hash"),
    ],
)
def test_malformed_iterations_are_refused(changes: dict[str, object], fragment: str) -> None:
    chain = ChainBuilder()
    chain.add(replace(chain.iteration(), **changes))  # type: ignore[arg-type]
    _expect(chain.stored, 1, "iteration", fragment)


def test_iteration_cannot_bind_to_a_head_older_than_the_previous_iteration() -> None:
    chain = ChainBuilder()
    stale = chain.iteration()
    chain.add(chain.iteration())
    chain.add(replace(chain.iteration(), opened_head=stale.opened_head))
    _expect(chain.stored, 2, "iteration", "opened_head is not the hash")


def test_checkpoint_needs_a_quorum_of_distinct_admitted_attestors() -> None:
    chain = ChainBuilder(workers=3, admitted=2)
    chain.add(chain.iteration())
    state = bytes([1]) * 32
    one = chain.attestation(chain.workers[0], 1, state)
    chain.add(Checkpoint(1, state, (one, one), 2))
    _expect(chain.stored, 2, "checkpoint", "1 distinct attestors, quorum is 2")


@pytest.mark.parametrize(
    ("attestor", "iteration", "attested", "fragment"),
    [
        (2, 1, bytes([1]) * 32, "is not admitted"),
        (0, 1, bytes([2]) * 32, "attests another state hash"),
        (0, 0, bytes([1]) * 32, "bound to iteration 0, not 1"),
    ],
)
def test_checkpoint_attestations_are_checked(attestor: int, iteration: int, attested: bytes, fragment: str) -> None:
    chain = ChainBuilder(workers=3, admitted=2)
    chain.add(chain.iteration())
    state = bytes([1]) * 32
    chain.add(Checkpoint(1, state, (chain.attestation(chain.workers[attestor], iteration, attested),), 1))
    _expect(chain.stored, 2, "checkpoint", fragment)


def test_checkpoint_beyond_the_ledger_or_of_a_wrong_base_is_refused() -> None:
    chain = ChainBuilder()
    chain.add(Checkpoint(0, bytes(32), (chain.attestation(chain.workers[0], 0, bytes(32)),), 1))
    _expect(chain.stored, 1, "checkpoint", "does not carry the genesis base state hash")
    chain = ChainBuilder()
    chain.add(Checkpoint(3, bytes(32), (chain.attestation(chain.workers[0], 3, bytes(32)),), 1))
    _expect(chain.stored, 1, "checkpoint", "beyond the last iteration 0")
    chain = ChainBuilder()
    chain.add(Checkpoint(0, BASE_STATE, (chain.attestation(chain.workers[0], 0, BASE_STATE),), 1))
    assert ledger.verify_chain(chain.stored).ok


def test_pinned_coordinator_key_must_match_genesis() -> None:
    chain = ChainBuilder()
    other = identity.public_key_bytes(identity.generate_key())
    problem = _problem(chain.stored, coordinator_key=other)
    assert (problem.index, problem.kind) == (0, "genesis") and "not the expected one" in problem.message


def test_genesis_must_come_first_and_only_once() -> None:
    chain = ChainBuilder()
    genesis = entries.parse_entry(chain.stored[0]).entry.body
    chain.add(genesis)
    _expect(chain.stored, 1, "genesis", "a second genesis")
    _expect(chain.stored[1:], 0, "genesis", "index 0")


def test_genesis_spec_digest_is_checked() -> None:
    chain = ChainBuilder()
    entry = entries.parse_entry(chain.stored[0]).entry
    body = replace(entry.body, job_spec=b"another spec")  # type: ignore[type-var]
    _expect([entries.seal(chain.coordinator, replace(entry, body=body))], 0, "genesis", "job_spec_sha256")


def test_entry_of_another_job_is_refused() -> None:
    chain = ChainBuilder()
    entry = entries.next_entry(entries.parse_entry(chain.stored[0]), Admission(chain.key(0), "x", "op"), 5)
    stored = [*chain.stored, entries.seal(chain.coordinator, replace(entry, job_id="job-other"))]
    _expect(stored, 1, "admission", "belongs to job 'job-other'")


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe", b"\x0a\x01", bytes(100)])
def test_garbage_entries_give_a_report_not_an_exception(garbage: bytes) -> None:
    chain = ChainBuilder()
    _expect([garbage], 0, "unknown", "malformed")
    problem = _problem([*chain.stored, garbage])
    assert problem.index == 1


def test_empty_ledger_is_not_sound() -> None:
    _expect([], 0, "none", "empty")


def test_batch_problem_checks_one_recorded_batch_against_the_chain() -> None:
    chain = ChainBuilder()
    state, _ = ledger.start(chain.stored[0])
    body = chain.iteration()
    assert ledger.batch_problem(state, body.batches[0], 4) is None
    assert "member 3 is not in the iteration" in str(ledger.batch_problem(state, body.batches[0], 3))
    stranger = identity.generate_key()
    foreign = Recorded(chain.batch(stranger, 1, [0], body.opened_head, [0.5]))
    assert "not admitted" in str(ledger.batch_problem(state, foreign, 4))


def test_the_first_forged_batch_in_ledger_order_is_reported_when_several_are_checked_on_the_pool() -> None:
    """Signatures of many entries are checked ahead on other threads; which check ends first must not
    matter: the report names the first bad batch in ledger order (its entry and its place in it)."""
    chain = ChainBuilder(workers=3 * precheck.BATCH_CHUNK)
    stored: list[bytes] = []
    for forge in (None, 30, 5):
        honest = chain.iteration(members=2 * len(chain.workers))
        if forge is not None:
            bad = honest.batches[forge]
            honest = replace(honest, batches=(*honest.batches[:forge], replace(bad, batch=replace(bad.batch, signature=bytes(64))), *honest.batches[forge + 1 :]))
        stored = _one_iteration(chain, members=honest.plan.population, batches=honest.batches)
    _expect(stored, 2, "iteration", "batch 30: worker signature invalid")
    report = ledger.verify_chain(stored, threads=4)
    assert report.entries == 2 and report.kinds == {"genesis": 1, "iteration": 1}  # what was sound before it
