"""Batch signatures checked off the event loop: only what verifies is vouched for, concurrent submissions share a check."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from swarmtune import batches, identity
from swarmtune.coordinator.validation import MAX_BATCH_BYTES
from swarmtune.coordinator.verifier import CHUNK, Verifier, Vouched, verified

HEAD = bytes(32)


def signed(members: list[int]) -> batches.Batch:
    return batches.sign_batch(identity.generate_key(), "job", 1, HEAD, members, [0.5] * len(members))


def test_only_batches_whose_key_signed_them_are_vouched_for() -> None:
    good = signed([0, 1, 2])
    other = signed([3])
    forged = replace(good, signature=other.signature)
    raw = [batches.encode_batch(good), batches.encode_batch(forged), b"\xff not a batch", b"\x00" * (MAX_BATCH_BYTES + 1)]
    assert verified(raw, MAX_BATCH_BYTES) == {raw[0]: good}


def test_submissions_waiting_together_share_one_check_and_each_learns_its_own() -> None:
    ones = [signed([m]) for m in range(6)]

    async def scenario() -> list[Vouched]:
        verifier = Verifier(MAX_BATCH_BYTES)
        checks = [verifier.check([batches.encode_batch(b)]) for b in ones]
        return [*await asyncio.gather(*checks), await verifier.check([])]

    *answers, empty = asyncio.run(scenario())
    assert empty == {}
    for batch, answer in zip(ones, answers):
        assert answer[batches.encode_batch(batch)] == batch
    assert len({id(a) for a in answers}) == 1  # submitted in one moment: one check for all


def test_a_crowd_of_submissions_is_checked_in_chunks() -> None:
    crowd = [batches.encode_batch(signed([m])) for m in range(CHUNK + 1)]

    async def scenario() -> list[Vouched]:
        verifier = Verifier(MAX_BATCH_BYTES)
        return list(await asyncio.gather(*(verifier.check([data]) for data in crowd)))

    answers = asyncio.run(scenario())
    assert [len(a) for a in answers] == [CHUNK] * CHUNK + [1]  # the first CHUNK together, the last alone
