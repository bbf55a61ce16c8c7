"""Result batches' signatures checked beside the event loop: what the submissions of one moment bring, in one thread call."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Iterable, Mapping, Sequence

from swarmtune import batches
from swarmtune.batches import Batch

Vouched = Mapping[bytes, Batch]  # serialized ResultBatch -> its decoded batch, whose worker key signed it

# Batches one thread call checks at most (~2-4 ms of Ed25519 here): the loop takes the submissions of
# one chunk while the thread checks the next, and no burst of hundreds lands on the loop at once.
CHUNK = 32


def verified(raw: Iterable[bytes], max_bytes: int) -> dict[bytes, Batch]:
    """Each serialized ResultBatch that decodes and whose worker key signed it, decoded; anything else
    (too large, malformed, a bad signature) is left out for the validation to refuse with its reason."""
    out = {}
    for data in raw:
        if len(data) > max_bytes:
            continue
        try:
            batch = batches.decode_batch(data)
        except batches.BatchError:
            continue
        if batches.verify_batch(batch):
            out[data] = batch
    return out


class Verifier:
    """`check` returns the batches that verify among a submission's, decoded. Submissions that arrive
    while a check runs share a later one (up to CHUNK batches each): one thread hop for many, and
    OpenSSL's Ed25519 runs without the GIL, so the loop goes on taking calls meanwhile (on 2 cores at
    1,000 workers the checks were ~15% of the loop's time)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._chunks: deque[tuple[list[bytes], asyncio.Future[Vouched]]] = deque()
        self._running: asyncio.Task[None] | None = None

    async def check(self, raw: Sequence[bytes]) -> Vouched:
        if not raw:
            return {}
        if not self._chunks or len(self._chunks[-1][0]) >= CHUNK:
            self._chunks.append(([], asyncio.get_running_loop().create_future()))
        pending, done = self._chunks[-1]
        pending.extend(raw)
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._run())
        return await asyncio.shield(done)

    async def _run(self) -> None:
        while self._chunks:
            raw, done = self._chunks.popleft()  # taken off first: later submissions start a new chunk
            try:
                done.set_result(await asyncio.to_thread(verified, raw, self._max_bytes))
            except Exception as exc:  # every waiter learns of it; its submission fails, nothing taken
                done.set_exception(exc)
