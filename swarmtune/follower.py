"""A site's verified copy of a job as its ledger grows: the chain state and the exact replica, moved together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from swarmtune import ledger
from swarmtune.digest import Digest, advance_digest
from swarmtune.entries import Iteration, StoredEntry
from swarmtune.noisecache import NoiseCache
from swarmtune.replay import Replica


class LedgerFollower:
    """Takes a job's entries in order, each verified against the chain (ledger.walk) before an
    iteration entry is applied exactly to the replica; the chain state moves once an entry is applied.
    A replica handed over at iteration T (restored from a snapshot) has iterations 1..T verified only."""

    def __init__(
        self,
        chain: ledger.ChainState,
        replica: Replica,
        noise_cache: NoiseCache | None = None,
        verifier: ThreadPoolExecutor | None = None,
    ) -> None:
        self.chain = chain
        self.replica = replica
        self._noise_cache = noise_cache  # noise the site already drew for members, drawn again by the update
        self._verifier = verifier  # a pool kept across entries for result batches' signatures (None: one per walk)
        self.applied = 0  # iterations applied to the replica (a late joiner's tail)

    @property
    def next_index(self) -> int:
        return self.chain.next_index

    def follow(self, stored_entries: Iterable[bytes], vouched: ledger.Vouched = ()) -> Iterator[StoredEntry]:
        """Verify and apply each entry, yielding it once applied (a caller may act between entries);
        `vouched`: result batch signatures this site made itself. Raises ledger.LedgerError at a bad entry."""
        for chain, entry in ledger.walk(stored_entries, self.chain, vouched=vouched, pool=self._verifier):
            body = entry.entry.body
            # A replica restored from a snapshot is ahead of the chain: the iterations it holds are verified only.
            if isinstance(body, Iteration) and body.iteration > self.replica.iteration:
                self.replica.apply(body, self._noise_cache)
                self.applied += 1
            self.chain = chain
            yield entry

    def accept(self, stored: bytes, vouched: ledger.Vouched = ()) -> StoredEntry:
        """Verify and apply the next entry (a live one, as it arrives)."""
        (entry,) = self.follow([stored], vouched)
        return entry

    def accept_digest(self, data: bytes) -> Digest:
        """Take the next entry, an iteration, by its coordinator-signed digest (digest.advance_digest) and
        apply its update: the chain moves to the full entry's hash, whose batches are not checked here."""
        chain, digest = advance_digest(self.chain, data)
        if digest.iteration > self.replica.iteration:
            self.replica.apply(digest.as_iteration(), self._noise_cache)
            self.applied += 1
        self.chain = chain
        return digest
