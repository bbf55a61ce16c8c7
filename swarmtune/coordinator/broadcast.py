"""Fan-out of announcements to subscribed workers: serialized once, one bounded queue per worker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

from swarmtune.coordinator.limits import Refused
from swarmtune.wire import service_pb2 as pb


@dataclass(frozen=True)
class Outgoing:
    """A serialized Announcement, with what the stream needs to know about it."""

    data: bytes
    index: int | None = None  # ledger index, for an entry announcement
    opened: int | None = None  # iteration, for an IterationOpened


@dataclass(frozen=True)
class End:
    """Why a subscription stream ends (its last queue item)."""

    reason: str
    overflow: bool = False  # the worker read too slowly; it should resubscribe from its index


def announce(message: pb.Announcement, index: int | None = None, opened: int | None = None) -> Outgoing:
    return Outgoing(message.SerializeToString(), index, opened)


def entry_outgoing(index: int, stored: bytes) -> Outgoing:
    return announce(pb.Announcement(entry=pb.LedgerEntry(index=index, stored=stored)), index=index)


def compact_outgoing(index: int, digest: bytes) -> Outgoing:
    """A live iteration entry as workers get it: its signed digest (they fetch the entry to audit it)."""
    return announce(pb.Announcement(compact=pb.Compact(index=index, digest=digest)), index=index)


@dataclass(eq=False)
class Subscriber:
    key: bytes
    limit: int
    queue: asyncio.Queue[Outgoing | End] = field(default_factory=asyncio.Queue)
    ended: bool = False
    opened: int = 0  # the last iteration whose IterationOpened this stream was given

    def put(self, message: Outgoing | End) -> None:
        if self.ended:
            return
        if isinstance(message, End):
            self.ended = True
        elif self.queue.qsize() >= self.limit:
            # A stalled reader must not hold the coordinator's memory hostage: cut it loose instead.
            self.ended = True
            message = End(f"more than {self.limit} announcements unread", overflow=True)
        elif message.opened is not None:
            self.opened = message.opened
        self.queue.put_nowait(message)

    async def messages(self) -> AsyncIterator[Outgoing]:
        """What was put, until the stream's End (an overflow refuses the stream: resubscribe)."""
        while True:
            message = await self.queue.get()
            if isinstance(message, End):
                if message.overflow:
                    raise Refused("RESOURCE_EXHAUSTED", f"{message.reason}; resubscribe from the next index you need")
                return
            yield message


class Broadcaster:
    """At most one subscription per worker key; a new one ends the previous one."""

    def __init__(self, queue_limit: int) -> None:
        self._limit = queue_limit
        self._by_key: dict[bytes, Subscriber] = {}

    def add(self, key: bytes) -> Subscriber:
        previous = self._by_key.get(key)
        if previous is not None:
            previous.put(End("superseded by a newer subscription of the same worker"))
        subscriber = Subscriber(key, self._limit)
        self._by_key[key] = subscriber
        return subscriber

    def remove(self, subscriber: Subscriber) -> bool:
        """Forget a finished subscription; True if it was the worker's current one."""
        if self._by_key.get(subscriber.key) is subscriber:
            del self._by_key[subscriber.key]
            return True
        return False

    def connected(self) -> Iterable[bytes]:
        return [key for key, s in self._by_key.items() if not s.ended]

    def announced(self, key: bytes, iteration: int) -> bool:
        """The worker's current stream was given iteration's IterationOpened."""
        subscriber = self._by_key.get(key)
        return subscriber is not None and subscriber.opened == iteration

    def send(self, key: bytes, message: Outgoing | End) -> None:
        subscriber = self._by_key.get(key)
        if subscriber is not None:
            subscriber.put(message)

    def publish(self, message: Outgoing | End) -> None:
        for subscriber in list(self._by_key.values()):
            subscriber.put(message)
