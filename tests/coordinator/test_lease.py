"""The job's lease against a real Redis: standby and takeover, renewal, loss, and the fence on writes;
and the start-up wait for Redis (backoff, limit, signal)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterator

import pytest

from swarmtune import entries
from swarmtune.coordinator.lease import Lease, LeaseTimings, holder_token, kept
from swarmtune.coordinator.waiting import RedisWait, wait_for_store
from swarmtune.headcheck import Head
from swarmtune.store import LEASE_KEY, LeaseLost, LedgerStore, StoreUnavailable, StoreUnreachable, connect
from tests.support.ledger_factory import sound_chain

SLACK_S = 2.0  # scheduling on a loaded machine
SHORT = LeaseTimings(ttl_s=1.0)


@pytest.fixture
def store(redis_url: str) -> Iterator[LedgerStore]:
    with connect(redis_url) as opened:
        yield opened


@pytest.fixture
def events() -> Iterator[list[logging.LogRecord]]:
    """The coordinator's log records (its logger may not propagate once a CLI test configured it)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("swarmtune.coordinator")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def named(records: list[logging.LogRecord], event: str) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage() == event]


def lease(store: LedgerStore, job_id: str, name: str, timings: LeaseTimings = SHORT) -> Lease:
    return Lease(store, job_id, holder_token(name), timings)


def test_a_standby_takes_over_within_the_bound_once_the_holder_stops_renewing(
    store: LedgerStore, job_id: str, events: list[logging.LogRecord]
) -> None:
    async def scenario() -> float:
        stop = asyncio.Event()
        active, standby = lease(store, job_id, "active"), lease(store, job_id, "standby")
        assert await active.acquire(stop)
        died = time.monotonic()  # from here on nobody renews: the holder is dead
        assert await asyncio.wait_for(standby.acquire(stop), SHORT.takeover_bound_s + SLACK_S)
        return time.monotonic() - died

    took = asyncio.run(scenario())
    assert SHORT.ttl_s - SHORT.poll_s <= took <= SHORT.takeover_bound_s + SLACK_S
    standing = named(events, "standing by")
    assert len(standing) == 1 and standing[0].holder.startswith(holder_token("active").rsplit(":", 1)[0])  # type: ignore[attr-defined]
    assert len(named(events, "lease acquired")) == 2


def test_a_kept_lease_outlives_its_ttl_and_its_release_hands_over_at_once(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> float:
        stop = asyncio.Event()
        active, standby = lease(store, job_id, "active"), lease(store, job_id, "standby")
        assert await active.acquire(stop)
        async with kept(active):
            waiting = asyncio.create_task(standby.acquire(stop))
            await asyncio.sleep(3 * SHORT.ttl_s)
            assert not waiting.done() and not active.lost.is_set()
            active.check()  # still ours: writes pass the fence
        released = time.monotonic()
        assert await asyncio.wait_for(waiting, SHORT.poll_s + SLACK_S)
        return time.monotonic() - released

    assert asyncio.run(scenario()) <= SHORT.poll_s + SLACK_S


def test_a_stolen_lease_is_lost_and_the_fence_refuses_every_write(
    store: LedgerStore, job_id: str, events: list[logging.LogRecord]
) -> None:
    async def scenario() -> None:
        active = lease(store, job_id, "active")
        assert await active.acquire(asyncio.Event())
        async with kept(active):
            store._client.set(LEASE_KEY.format(job=job_id), "another coordinator")
            await asyncio.wait_for(active.lost.wait(), SHORT.renew_every_s + SLACK_S)
        fenced = store.fenced(active.check, active.token)
        for write in (lambda: fenced.put_open(job_id, {b"meta": b"{}"}), lambda: fenced.delete_open(job_id)):
            with pytest.raises(LeaseLost, match="another coordinator holds it"):
                write()
        # Released on the way out only if it were ours: the new holder keeps it.
        assert store._client.get(LEASE_KEY.format(job=job_id)) == b"another coordinator"

    asyncio.run(scenario())
    assert store.get_open(job_id) == {}
    [lost] = named(events, "lease lost; stopping without writing")
    assert lost.levelno == logging.ERROR


def test_a_paused_holder_stops_writing_before_its_lease_can_lapse(store: LedgerStore, job_id: str) -> None:
    async def scenario() -> None:
        active = lease(store, job_id, "active")
        assert await active.acquire(asyncio.Event())
        fenced = store.fenced(active.check, active.token)
        fenced.put_open(job_id, {b"before": b"1"})
        time.sleep(SHORT.ttl_s - SHORT.margin_s)  # the whole process paused: no renewal ran
        with pytest.raises(LeaseLost, match="not renewed within"):
            fenced.put_open(job_id, {b"after": b"1"})
        async with kept(active):  # the renewal, once it runs, finds the lease out of time
            await asyncio.wait_for(active.lost.wait(), SHORT.renew_every_s + SLACK_S)
        assert "not renewed in time" in active.why

    asyncio.run(scenario())
    assert store.get_open(job_id) == {b"before": b"1"}


def test_redis_refuses_a_write_sent_after_the_lease_changed_hands(store: LedgerStore, job_id: str) -> None:
    """A process paused between its own lease check and the write (the check passed, the lease moved on
    meanwhile): the append and the open-state writes are refused by Redis itself, nothing is written."""
    chain = sound_chain(job_id=job_id)
    passed_check = store.fenced(lambda: None, "the paused coordinator")
    store._client.set(LEASE_KEY.format(job=job_id), "the paused coordinator")
    assert passed_check.append(chain.stored[0]).ok
    passed_check.put_open(job_id, {b"meta": b"mine"})
    store._client.set(LEASE_KEY.format(job=job_id), "the standby that took over")
    for write in (
        lambda: passed_check.append(chain.stored[1]),
        lambda: passed_check.put_open(job_id, {b"meta": b"stale"}),
        lambda: passed_check.delete_open(job_id),
    ):
        with pytest.raises(LeaseLost, match="lease no longer names this coordinator"):
            write()
    assert store.head(job_id) == Head(0, entries.entry_hash(chain.stored[0]))
    assert store.get_open(job_id) == {b"meta": b"mine"}
    store._client.delete(LEASE_KEY.format(job=job_id))  # lapsed, nobody holds it: still refused
    with pytest.raises(LeaseLost):
        passed_check.append(chain.stored[1])


def test_a_lease_with_no_expiry_is_reported_and_a_signal_ends_the_standby(
    store: LedgerStore, job_id: str, events: list[logging.LogRecord]
) -> None:
    store._client.set(LEASE_KEY.format(job=job_id), "left by hand")

    async def scenario() -> bool:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        return await asyncio.wait_for(lease(store, job_id, "standby").acquire(stop), SLACK_S + 1)

    assert asyncio.run(scenario()) is False
    [warned] = named(events, "standing by behind a lease with no expiry")
    assert f"DEL {LEASE_KEY.format(job=job_id)}" in warned.advice  # type: ignore[attr-defined]


# ---- waiting for Redis ----------------------------------------------------------------------------


def flaky(store: LedgerStore, failures: int, error: Exception) -> Callable[[], LedgerStore]:
    """A connect that fails `failures` times with `error`, then returns `store`."""
    calls = iter(range(failures + 1))

    def connect_once() -> LedgerStore:
        if next(calls) < failures:
            raise error
        return store

    return connect_once


UNREACHABLE = StoreUnreachable("cannot reach Redis at unix:///nowhere.sock")


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [RedisWait(first_s=0.5, cap_s=30).delay_s(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_redis_is_retried_with_each_try_logged(store: LedgerStore, events: list[logging.LogRecord]) -> None:
    wait = RedisWait(first_s=0.01, cap_s=0.02)
    got = asyncio.run(wait_for_store(flaky(store, 3, UNREACHABLE), "unix:///nowhere.sock", wait, asyncio.Event()))
    assert got is store
    tries = named(events, "waiting for Redis")
    assert [(r.attempt, r.next_delay_s) for r in tries] == [(1, 0.01), (2, 0.02), (3, 0.02)]  # type: ignore[attr-defined]
    assert named(events, "Redis reachable")[0].attempt == 4  # type: ignore[attr-defined]


def test_redis_wait_gives_up_at_its_limit_and_a_signal_ends_it(store: LedgerStore) -> None:
    async def limited() -> None:
        await wait_for_store(flaky(store, 1000, UNREACHABLE), "unix:///nowhere.sock", RedisWait(limit_s=0.3, first_s=0.05), asyncio.Event())

    with pytest.raises(StoreUnreachable, match=r"gave up after \d+ tries .*--redis-wait 0.3"):
        asyncio.run(limited())

    async def stopped() -> LedgerStore | None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        return await wait_for_store(flaky(store, 1000, UNREACHABLE), "unix:///nowhere.sock", RedisWait(first_s=30), stop)

    started = time.monotonic()
    assert asyncio.run(stopped()) is None
    assert time.monotonic() - started < SLACK_S


def test_refused_credentials_are_not_waited_for(store: LedgerStore) -> None:
    refused = StoreUnavailable("Redis at redis://127.0.0.1:6379 refused our credentials")
    with pytest.raises(StoreUnavailable, match="refused our credentials"):
        asyncio.run(wait_for_store(flaky(store, 1, refused), "redis://127.0.0.1:6379", RedisWait(first_s=0.01), asyncio.Event()))
