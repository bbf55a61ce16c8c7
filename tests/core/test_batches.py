"""Batch-signed results and iteration digests, the pure parts: packing, signing, tallying, verifying."""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from itertools import accumulate

import pytest

from swarmtune import batches, coefficients, entries, identity, ledger, shaping
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


def _decoded(data: bytes) -> tuple[int, ...] | None:
    """Canonical member gaps read plainly, value by value (None: not canonical), as PROTOCOL §5.5 says."""
    values = re.findall(rb"[\x80-\xff]*[\x01-\x7f]", data)
    if 0 in data or b"".join(values) != data:
        return None
    gaps = [sum((byte & 0x7F) << (7 * i) for i, byte in enumerate(value)) for value in values]
    members = tuple(accumulate(gaps, initial=-1))[1:]
    return None if members and members[-1] >= 2**32 else members


def test_member_bytes_decode_as_read_plainly_whatever_their_shape() -> None:
    """Strided, consecutive, irregular and arbitrary bytes: the fast paths agree with the plain reading."""
    rng = random.Random(5)
    for _ in range(5000):
        if rng.random() < 0.5:
            start, stride = rng.choice([0, 127, 128, 16_384, rng.randrange(2**32)]), rng.choice([1, 2, 128, 256, 1000, 2**21, rng.randrange(1, 2**28)])
            members = [m for m in (start + stride * i for i in range(rng.randrange(70))) if m < 2**32]
            if len(members) > 2 and rng.random() < 0.3:
                del members[rng.randrange(len(members))]
            data = batches.pack_members(members)
        else:
            data = bytes(rng.choice([0, 1, 2, 0x7F, 0x80, 0x81, 0xFF, rng.randrange(256)]) for _ in range(rng.randrange(12)))
        expected = _decoded(data)
        if expected is None:
            with pytest.raises(BatchError):
                batches.unpack_members(data)
        else:
            assert batches.unpack_members(data) == expected, data


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
    # The coordinator's digest carries the coefficients it built; the builder's job spec is no TOML,
    # so the walk has no rule to derive them: given here as the coordinator would have them.
    entry = coefficients.with_coefficients(entry, shaping.Rule("zscore", 5e-4, 4))
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
    digest = digest_of(coefficients.with_coefficients(entries.parse_entry(chain.stored[1]), shaping.Rule("zscore", 5e-4, 4)))
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
