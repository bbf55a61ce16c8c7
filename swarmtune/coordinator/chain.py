"""The coordinator's ledger: recover what the chain says, then seal and append entries one at a time."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import entries, identity, ledger
from swarmtune.coordinator.close import retention_alerts
from swarmtune.coordinator.figures import RECENT_ITERATIONS, IterationFigures, figures_of
from swarmtune.redundancy import Verdict, strikes, strikes_named, verdicts_of
from swarmtune.entries import Admission, Checkpoint, Genesis, Iteration, Revocation, Signed, StoredEntry
from swarmtune.store import LedgerStore
from swarmtune.wire import ledger_pb2


class ChainConflict(Exception):
    """The stored head is not ours: two coordinators must never run one job."""


@dataclass
class History:
    """What the ledger says so far, kept current as the coordinator appends: `note` is the one place
    that counts anything (strikes, figures), so a live run and a recovered run cannot disagree."""

    genesis: Genesis
    genesis_hash: bytes
    head: StoredEntry
    admitted: set[bytes]
    revoked: set[bytes]
    tolerance: float  # the job's redundancy tolerance: strikes are recounted from recorded results
    last_iteration: int = 0
    operators: dict[bytes, str] = field(default_factory=dict)  # from admission entries
    referees: set[bytes] = field(default_factory=set)  # admitted with the referee role
    strikes: Counter[bytes] = field(default_factory=Counter)  # disagreements with a standing majority
    baselines: dict[str, float] = field(default_factory=dict)  # first value of each retention figure
    attested: dict[bytes, dict[int, bytes]] = field(default_factory=dict)  # key -> iteration -> signed bytes
    figures: deque[IterationFigures] = field(default_factory=lambda: deque(maxlen=RECENT_ITERATIONS))
    last_checkpoint: int = 0  # iteration of the newest checkpoint entry (0: none)
    # The heads the next iteration may be opened at (PROTOCOL §5.4): the last iteration entry (or
    # genesis) and every entry since; a resumed iteration's head must be one of them.
    open_heads: set[bytes] = field(default_factory=set)

    @classmethod
    def begin(cls, genesis_entry: StoredEntry, tolerance: float) -> History:
        """The history of a ledger that holds only its (verified) genesis."""
        genesis = genesis_entry.entry.body
        assert isinstance(genesis, Genesis)  # the walk checked it
        history = cls(genesis, genesis_entry.hash, genesis_entry, set(genesis.admitted_workers), set(), tolerance)
        history.open_heads.add(genesis_entry.hash)
        return history

    @property
    def active_referees(self) -> frozenset[bytes]:
        return frozenset(self.referees - self.revoked)

    def strikes_with(self, verdicts: Iterable[Verdict]) -> Counter[bytes]:
        """The strike counts once these verdicts are recorded too (what a close's revocations go by)."""
        return self.strikes + strikes(verdicts)

    def note(self, stored: StoredEntry) -> None:
        """Account for an entry that is now the head."""
        self.head = stored
        body = stored.entry.body
        if isinstance(body, Iteration):
            self.open_heads.clear()
            self.last_iteration = body.iteration
            # Recorded results include the dissenting replicas of every standing member (a dissent
            # needs another replica: members with one cannot have any).
            self.strikes.update(strikes(verdicts_of(body.replicated(), frozenset(), self.tolerance, self.referees).values()))
            _, self.baselines = retention_alerts(body.retention, self.baselines, 0.0)
            self.figures.append(figures_of(body))
        elif isinstance(body, Admission):
            self.admitted.add(body.worker_key)
            self.operators[body.worker_key] = body.operator_fingerprint
            if body.role == entries.ROLE_REFEREE:
                self.referees.add(body.worker_key)
        elif isinstance(body, Revocation):
            self.admitted.discard(body.worker_key)
            self.revoked.add(body.worker_key)
            # The dissents that revoked a key are not recorded (its results stop counting in that
            # very iteration); its revocation names their count.
            named = strikes_named(body.reason)
            if named is not None:
                self.strikes[body.worker_key] = named
        elif isinstance(body, Signed):
            record = body.record
            self.attested.setdefault(record.worker_key, {})[record.iteration] = entries.encode_signed(body)
        elif isinstance(body, Checkpoint):
            self.last_checkpoint = max(self.last_checkpoint, body.iteration)
        self.open_heads.add(stored.hash)


def recover(stored_entries: Iterable[bytes], coordinator_key: bytes, tolerance: float) -> History:
    """Verify the whole stored chain (pinning our coordinator key) and summarize it."""
    history: History | None = None
    for _, entry in ledger.walk(stored_entries, coordinator_key=coordinator_key):
        if history is None:
            history = History.begin(entry, tolerance)
        else:
            history.note(entry)
    if history is None:
        raise ValueError("the ledger is empty; write its genesis first")
    return history


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Chain:
    """Appends entries in order, each sealed by the coordinator key and compare-and-appended.

    An append is one synchronous step, on purpose: it takes milliseconds and happens a few times per
    iteration, and without an await inside, two appends can never interleave and a cancelled caller
    (a worker hanging up on Join or Attest) can never leave an entry stored but our head behind.
    Waiting in a thread instead would queue the close behind every pending broadcast write.
    """

    def __init__(self, store: LedgerStore, key: Ed25519PrivateKey, history: History) -> None:
        self._store = store
        self._key = key
        self.history = history

    @property
    def head(self) -> StoredEntry:
        return self.history.head

    def append(self, body: entries.Body) -> StoredEntry:
        """Seal `body` after the head and append it; an iteration entry also drops the open state."""
        entry = entries.next_entry(self.head, body, now_ms())
        stored = entries.seal(self._key, entry)
        result = self._store.append(stored, close_open=isinstance(body, Iteration))
        if not result.ok:
            found = "none" if result.head is None else f"entry {result.head.index} (hash {result.head.hash.hex()[:16]})"
            raise ChainConflict(
                f"appending entry {entry.index} of job {entry.job_id!r} found {result.status.value}: the head record "
                f"in Redis names {found}, this coordinator's head is entry {self.head.entry.index} (hash {self.head.hash.hex()[:16]}). "
                "Either another coordinator runs the job (run only one; restarted, this one resumes from the "
                "ledger) or the head record was changed: a restart then refuses to start and says how to repair it"
            )
        # We built `entry` ourselves: only the envelope needs reading back, not every result in it.
        envelope = ledger_pb2.SignedEntry.FromString(stored)
        appended = StoredEntry(entry, envelope.entry, envelope.signature, stored, entries.entry_hash(stored))
        self.history.note(appended)
        return appended


def genesis_entry(key: Ed25519PrivateKey, job_id: str, genesis: Genesis) -> bytes:
    return entries.seal(key, entries.first_entry(job_id, genesis, now_ms()))


def check_genesis(stored: bytes, job_spec: bytes, coordinator_key: bytes) -> str | None:
    """Why an existing ledger, whose first stored entry is `stored`, is not this job's (None if it is)."""
    try:
        genesis = entries.parse_entry(stored).entry.body
    except entries.EntryError as exc:
        return f"its first entry does not parse ({exc}); audit it (`swarmtune audit --redis-url`)"
    if not isinstance(genesis, Genesis):
        return "its first entry is not a genesis; audit it (`swarmtune audit --redis-url`)"
    if genesis.job_spec != job_spec:
        return "its genesis holds a different job spec; give this job a new [job] id, or use the original spec file"
    if genesis.coordinator_key != coordinator_key:
        return (
            f"it was started by coordinator key {identity.fingerprint(genesis.coordinator_key)}; "
            "pass that key with --key"
        )
    return None
