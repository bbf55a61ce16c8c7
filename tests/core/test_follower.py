"""The ledger follower: entries verified, then iterations applied exactly, live one by one or many at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import cast

import pytest
from torch import nn

from swarmtune import entries, ledger, precheck
from swarmtune.entries import Genesis
from swarmtune.follower import LedgerFollower
from swarmtune.replay import replica_from_genesis
from tests.support.replay_ledger import build_ledger, direct_hashes
from tests.support.tiny_models import tiny_llama


def started(stored: list[bytes], model: nn.Module, verifier: ThreadPoolExecutor | None = None) -> LedgerFollower:
    """A follower at genesis: the next entry it takes is entry 1."""
    chain, genesis = ledger.start(stored[0])
    return LedgerFollower(chain, replica_from_genesis(model, cast(Genesis, genesis.entry.body)), verifier=verifier)


def test_entries_followed_at_once_or_live_reach_the_same_exact_state() -> None:
    model = tiny_llama(hidden=16)
    stored = build_ledger(model)
    expected = direct_hashes(model, stored)
    many = started(stored, model)
    hashes = [many.replica.state_hash() for _ in many.follow(stored[1:])]
    assert hashes == expected and many.next_index == len(stored) and many.chain.last_iteration == 3
    with ThreadPoolExecutor(2) as verifier:
        live = started(stored, model, verifier)
        applied = [live.accept(data) for data in stored[1:]]
    assert [entry.hash for entry in applied] == [entries.parse_entry(data).hash for data in stored[1:]]
    assert live.replica.state_hash() == expected[-1] and live.chain == many.chain


def test_a_bad_entry_moves_neither_the_chain_nor_the_replica() -> None:
    model = tiny_llama(hidden=16)
    stored = build_ledger(model)
    follower = started(stored, model)
    follower.accept(stored[1])
    before = (follower.chain, follower.replica.state_hash())
    with pytest.raises(ledger.LedgerError, match="an entry is missing"):
        follower.accept(stored[3])
    with pytest.raises(ledger.LedgerError, match="malformed"):
        follower.accept(b"not an entry")
    assert (follower.chain, follower.replica.state_hash()) == before and follower.replica.iteration == 1


def test_live_entries_are_checked_on_the_followers_own_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker checks each live entry's results on its persistent pool: no pool is built per entry."""
    model = tiny_llama(hidden=16)
    stored = build_ledger(model)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread pool was built for one entry")

    with ThreadPoolExecutor(2) as verifier:
        follower = started(stored, model, verifier)
        monkeypatch.setattr(precheck, "ThreadPoolExecutor", refused)
        for data in stored[1:]:
            follower.accept(data)
    assert follower.replica.iteration == 3
