"""Batch-signed results and iteration digests, the pure parts: packing, signing, tallying, verifying."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from swarmtune import batches, entries, identity, ledger
from swarmtune.batches import BatchError, Recorded
from swarmtune.digest import advance_digest, digest_of, seal_digest
from tests.support.ledger_factory import ChainBuilder

HEAD = bytes(range(32))


@pytest.mark.parametrize(
    "members",
    [[], [0], [5], [0, 1, 2, 3], [127, 128, 129], list(range(16_320, 16_384)), [3, 200, 70_000, 2**32 - 1], list(range(0, 4096, 7))],
)
def test_members_round_trip_through_their_canonical_gaps(members: list[int]) -> None:
    packed = batches.pack_members(members)
    assert batches.unpack_members(packed) == tuple(members)
    if members and max(b - a for a, b in zip([-1, *members], members)) < 0x80:
        assert len(packed) == len(members)  # one byte a member where they are close


def test_consecutive_members_cost_one_byte_each_after_the_first() -> None:
    assert len(batches.pack_members(range(16_320, 16_384))) == 2 + 63  # 16,321 takes two 7-bit groups


@pytest.mark.parametrize("members", [[1, 1], [2, 1], [-1], [2**32]])
def test_members_must_be_strictly_increasing_u32(members: list[int]) -> None:
    with pytest.raises(ValueError):
        batches.pack_members(members)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x01\x00", "canonical"),  # a zero gap: member 0 twice
        (b"\x81\x00", "canonical"),  # 1 written with a redundant byte
        (b"\x81", "inside a LEB128 value"),
        (b"\xff\xff\xff\xff\x1f", "does not fit a u32"),
    ],
)
def test_non_canonical_member_bytes_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(BatchError, match=fragment):
        batches.unpack_members(data)


def test_a_batch_is_signed_once_bound_to_job_iteration_head_and_key() -> None:
    key = identity.generate_key()
    batch = batches.sign_batch(key, "job-a", 3, HEAD, [9, 2, 4], [0.9, 0.2, 0.4])
    assert (batch.members, batch.rewards) == ((2, 4, 9), (0.2, 0.4, 0.9))  # sorted by member, pairs kept
    assert batches.verify_batch(batch) and batches.decode_batch(batches.encode_batch(batch)) == batch
    # Ed25519 is deterministic: the same members and rewards are the same bytes (a resend is a duplicate).
    assert batches.sign_batch(key, "job-a", 3, HEAD, [2, 4, 9], [0.2, 0.4, 0.9]) == batch
    bound = {"job_id": "job-b", "iteration": 4, "head_hash": bytes(32), "worker_key": identity.public_key_bytes(identity.generate_key())}
    for field, value in bound.items():
        assert not batches.verify_batch(replace(batch, **{field: value})), field
    tampered = batches.parts("job-a", 3, HEAD, batch.worker_key, batch.packed_members, batches.pack_rewards([0.2, 0.4, 1.0]), batch.signature)
    assert not batches.verify_batch(tampered)


def test_the_payload_is_length_prefixed_so_no_two_batches_share_it() -> None:
    key = identity.public_key_bytes(identity.generate_key())
    a = batches.payload("ab", 1, HEAD, key, batches.pack_members([1]), batches.pack_rewards([0.5]))
    b = batches.payload("a", 1, HEAD, key, batches.pack_members([1]), batches.pack_rewards([0.5]))
    assert a != b and a.startswith((2).to_bytes(4, "little") + b"ab")


@pytest.mark.parametrize("data", [b"", b"\xff", b"\x22\x03abc", b"\x2a\x01\x01\x32\x01"])
def test_garbage_is_a_batch_error(data: bytes) -> None:
    with pytest.raises(BatchError):
        batches.decode_batch(data)


def test_rewards_must_match_the_members() -> None:
    with pytest.raises(BatchError, match="2 members"):
        batches.parts("j", 1, HEAD, bytes(32), batches.pack_members([1, 2]), batches.pack_rewards([0.5]), bytes(64))


def test_tally_keeps_the_common_case_whole_and_several_replicas_apart() -> None:
    a, b = identity.generate_key(), identity.generate_key()
    first = Recorded(batches.sign_batch(a, "j", 1, HEAD, [0, 1, 2], [0.0, 0.1, 0.2]))
    second = Recorded(batches.sign_batch(b, "j", 1, HEAD, [2, 3], [0.5, 0.3]), excluded=(3,))
    one, several = batches.tally([first, second])
    assert one == {0: 0.0, 1: 0.1, 2: 0.2} and several == {2: [0.2, 0.5]}
    assert batches.differing(several) == [2]
    assert batches.settled_rewards(5, one, several, (0.5,)) == (0.0, 0.1, 0.5, 0.0, 0.0)
    assert batches.disputed_rewards(several, {0: 0.0, 1: 0.1, 2: 0.5}) == (0.5,)


def test_an_iteration_digest_takes_a_worker_to_the_full_entrys_hash() -> None:
    chain = ChainBuilder()
    chain.add(chain.iteration())
    state, _ = ledger.start(chain.stored[0])
    full, entry = ledger.advance(state, chain.stored[1])
    sealed = seal_digest(chain.coordinator, digest_of(entry))
    light, digest = advance_digest(state, sealed)
    assert light == full  # the same chain state as verifying the full entry
    body = entry.entry.body
    assert digest.as_iteration().members == body.members and digest.coefficients == body.coefficients  # type: ignore[union-attr]
    assert len(sealed) < len(chain.stored[1])


def test_a_digest_that_does_not_follow_the_chain_or_is_not_the_coordinators_is_refused() -> None:
    chain = ChainBuilder()
    chain.add(chain.iteration())
    state, _ = ledger.start(chain.stored[0])
    digest = digest_of(entries.parse_entry(chain.stored[1]))
    cases = {
        "coordinator signature invalid": seal_digest(identity.generate_key(), digest),
        "does not follow entry 0": seal_digest(chain.coordinator, replace(digest, prev_hash=bytes(32))),
        "expected 1": seal_digest(chain.coordinator, replace(digest, iteration=2)),
        "4 members but 3 coefficients": seal_digest(chain.coordinator, replace(digest, coefficients=digest.coefficients[:3])),
        "not a SignedDigest": b"\xff",
    }
    for fragment, sealed in cases.items():
        with pytest.raises(ledger.LedgerError, match=fragment):
            advance_digest(state, sealed)


def test_a_batch_recorded_with_a_nan_it_counts_is_refused_by_the_walk() -> None:
    chain = ChainBuilder()
    body = chain.iteration()
    nan = Recorded(chain.batch(chain.workers[0], 1, [0, 3], body.opened_head, [math.nan, 0.5]))
    chain.add(replace(body, batches=(nan, *body.batches[1:])))
    assert "not finite" in str(ledger.verify_chain(chain.stored).problem)
