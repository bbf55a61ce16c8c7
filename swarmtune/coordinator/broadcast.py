"""Fan-out of announcements to subscribed workers: serialized once, one bounded queue per worker, and
what queued up while a stream was busy sent as one message."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable, Sequence

from swarmtune.coordinator.limits import Refused
from swarmtune.wire import service_pb2 as pb

# Announcements one stream message carries at most (each the `then` of the one before): protobuf
# parsers refuse messages nested deeper than 100.
CARRY_LIMIT = 16
# ... and bytes at most, unless one announcement alone is larger: far below a worker's receive limit
# (worker/session.MAX_RECEIVE_BYTES), which every single announcement already respects.
CARRY_BYTES = 4 << 20
_THEN_KEY = bytes([pb.Announcement.THEN_FIELD_NUMBER << 3 | 2])  # field `then`, length-delimited


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


def _carried_size(message: Outgoing | End) -> int:
    return len(message.data) if isinstance(message, Outgoing) else 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def carried(announcements: Sequence[bytes]) -> bytes:
    """Serialized Announcements as one, each after the first in the `then` of the one before (PROTOCOL
    §6.4): the bytes are joined, not parsed, so a shared announcement stays serialized once."""
    out = announcements[-1]
    for data in reversed(announcements[:-1]):
        out = b"".join((data, _THEN_KEY, _varint(len(out)), out))
    return out


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

    async def messages(self, after: int) -> AsyncIterator[bytes]:
        """What was put, but entries at or below index `after` (the stream sent them already), until the
        stream's End (an overflow refuses the stream: resubscribe). Whatever is queued when the stream
        asks goes as one message: gRPC sends one message at a time, so what piled up meanwhile (a close
        and the next opening) costs one send, not one each."""
        held: Outgoing | End | None = None  # taken off the queue, but too large to carry with the last one
        while True:
            ready = [held if held is not None else await self.queue.get()]
            held, size = None, _carried_size(ready[0])
            while len(ready) < CARRY_LIMIT and not self.queue.empty():
                message = self.queue.get_nowait()
                size += _carried_size(message)
                if size > CARRY_BYTES:
                    held = message
                    break
                ready.append(message)
            sendable = [m.data for m in ready if isinstance(m, Outgoing) and (m.index is None or m.index > after)]
            if sendable:
                yield carried(sendable)
            last = ready[-1]  # nothing is put after an End
            if isinstance(last, End):
                if last.overflow:
                    raise Refused("RESOURCE_EXHAUSTED", f"{last.reason}; resubscribe from the next index you need")
                return


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
