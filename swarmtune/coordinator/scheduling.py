"""Who evaluates what: the opening assignment, re-assignment of lost and straggling members, and
telling each connected worker its part."""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import assignlog, assignment, draw, entries
from swarmtune.assignlog import Given
from swarmtune.coordinator.broadcast import Broadcaster, Outgoing, announce
from swarmtune.coordinator.chain import History, now_ms
from swarmtune.coordinator.close import Panel
from swarmtune.coordinator.lifecycle import OpenIteration
from swarmtune.coordinator.round import Round
from swarmtune.coordinator.sessions import Sessions
from swarmtune.jobspec import JobSpec
from swarmtune.entries import NoisePlan
from swarmtune.wire import service_pb2 as pb

log = logging.getLogger("swarmtune.coordinator")


class Scheduler:
    """Assigns the open round's members to connected, non-revoked workers (in the order the iteration's
    draw gives them), sends referees what they must re-evaluate, and announces it all."""

    def __init__(
        self,
        spec: JobSpec,
        history: History,
        sessions: Sessions,
        broadcast: Broadcaster,
        key: Ed25519PrivateKey,
        journal: Callable[[Mapping[bytes, bytes]], None],
    ) -> None:
        self._spec = spec
        self._history = history
        self._sessions = sessions
        self._broadcast = broadcast
        self._key = key
        self._journal = journal  # posts open-iteration fields to Redis without waiting

    def _connected(self, referees: bool) -> list[assignment.Candidate]:
        out = []
        for key in self._broadcast.connected():
            session = self._sessions.current(key)
            if session is not None and key not in self._history.revoked and (key in self._history.referees) == referees:
                out.append(assignment.Candidate(key, session.operator, session.capacity))
        return out

    def candidates(self) -> list[assignment.Candidate]:
        """Untrusted workers that can take members (referees only re-evaluate)."""
        return self._connected(referees=False)

    def empanel(self, current: Round, candidates: Sequence[assignment.Candidate]) -> None:
        """The round's draw, candidates, referees and spot checks (a pure function of the opened
        iteration and its candidates, so a resumed round gets the same draw)."""
        opened = current.open
        drawn = draw.make_draw(self._key, self._spec.job_id, opened.iteration, opened.head_hash)
        referees = self._history.active_referees
        spot = draw.spot_checks(drawn, opened.numbers, self._spec.spot_check) if referees else frozenset()
        order = assignment.drawn(candidates, drawn)
        capacities = tuple(c.capacity for c in order)
        operators = assignlog.operator_ranks([c.operator for c in order])
        current.empanel(Panel(referees, spot, drawn, tuple(c.key for c in order), capacities, operators))

    def reopen(self, current: Round, candidates: Sequence[assignment.Candidate]) -> None:
        """A resumed round: empanelled and holding the opening assignment over `candidates` (the
        opening's, read back from Redis, else those connected now)."""
        self.empanel(current, candidates)
        self._give_opening(current, candidates)

    def _target(self, candidates: Sequence[assignment.Candidate]) -> int:
        """Replicas per member: k, capped by the distinct operators connected (k while none is)."""
        return assignment.effective_replicas(self._spec.redundancy, candidates) if candidates else self._spec.redundancy

    def open_round(self, opened: OpenIteration) -> Round:
        """The round of a newly opened iteration, its members assigned and announced."""
        candidates = self.candidates()
        target = self._target(candidates)
        current = Round(opened, target, self._spec.redundancy_tolerance)
        self.empanel(current, candidates)
        self._give_opening(current, candidates)
        self._give_referees(current, {})
        self._post_log(current)
        if self._spec.retention_due(opened.iteration) and candidates:
            current.retention_worker = min(candidates, key=lambda c: (current.load(c.key), c.key)).key
        for key in self._broadcast.connected():
            self.announce_open(current, key)
        log.info("iteration opened", extra={"iteration": opened.iteration, "workers": len(candidates), "replicas": target})
        return current

    def _give_opening(self, current: Round, candidates: Sequence[assignment.Candidate]) -> None:
        members = list(current.open.numbers)
        for key, assigned in assignment.assign(members, candidates, self._target(candidates), current.panel.draw).items():
            current.give(key, assigned)

    def announce_open(self, current: Round, key: bytes) -> None:
        """The iteration's common part (serialized once per round) followed by this worker's part:
        protobuf merges repeated occurrences of a message field, so the concatenation parses as one."""
        opened = current.open
        if current.opened_bytes is None:
            common = pb.IterationOpened(
                iteration=opened.iteration,
                head_hash=opened.head_hash,
                plan=entries.plan_to_pb(NoisePlan(self._spec.job_seed, self._spec.population, self._spec.antithetic)),
            )
            current.opened_bytes = pb.Announcement(opened=common).SerializeToString()
        own = pb.IterationOpened(
            assigned=current.pending(key),
            deadline_ms=opened.deadline_ms,
            measure_retention=current.retention_worker == key and key not in current.retention,
        )
        data = current.opened_bytes + pb.Announcement(opened=own).SerializeToString()
        self._broadcast.send(key, Outgoing(data, opened=opened.iteration))

    def greet(self, current: Round | None, key: bytes) -> None:
        """A fresh stream learns the open iteration (unless it opened while the stream caught up)."""
        if current is not None and not current.closing and not self._broadcast.announced(key, current.open.iteration):
            self.reconcile(current)
            self.announce_open(current, key)

    def reconcile(self, current: Round) -> None:
        """Give members that lack holders to connected workers (after the straggle point, idle ones too)."""
        if current.closing:
            return
        candidates = self.candidates()
        current.retarget(self._target(candidates))
        needs = current.needs()
        straggling = current.straggling() if now_ms() >= current.open.straggle_ms else {}
        connected = {c.key for c in candidates}
        retention_moved = self._move_retention(current, connected)
        if not needs and not straggling and not retention_moved and not current.referee_needs():
            return
        load = {c.key: current.load(c.key) for c in candidates}
        holders = {m: frozenset(current.holders.get(m, ())) for m in {*needs, *straggling}}
        drawn = current.panel.draw
        disputed = {m for m in needs if len(current.replicas.get(m, {})) >= current.target}
        chosen = assignment.picks(needs, holders, candidates, load, drawn, disputed)
        given = [Given(p.member, p.worker, p.eligible, self._why(current, p.member)) for p in chosen]
        if straggling:
            # Only members nobody answered yet are stolen: an idle worker is the fastest one, and a
            # second opinion from it on an answered member would let fast colluders vote together.
            unanswered = {m: n for m, n in straggling.items() if not current.replicas.get(m)}
            busy = {p.worker for p in chosen}
            idle = [c for c in candidates if load[c.key] == 0 and c.key not in busy]
            stolen = assignment.picks(unanswered, holders, idle, load, drawn)
            current.stolen.update(p.member for p in stolen)
            given += [Given(p.member, p.worker, p.eligible, assignlog.STRAGGLER) for p in stolen]
        current.give_later(given)
        added = assignment.by_worker(given)
        self._give_referees(current, added)
        self._post_log(current)
        for key in set(added) | ({retention_moved} if retention_moved else set()):
            if self._broadcast.announced(key, current.open.iteration):
                message = pb.Reassignment(
                    iteration=current.open.iteration,
                    added=added.get(key, ()),
                    deadline_ms=current.open.deadline_ms,
                    measure_retention=key == retention_moved,
                )
                self._broadcast.send(key, announce(pb.Announcement(reassigned=message)))
        if added:
            log.info("members re-assigned", extra={"iteration": current.open.iteration, "members": sum(map(len, added.values()))})

    def _post_log(self, current: Round) -> None:
        """Post the opening's candidates and the later assignments to Redis, so a restart keeps them."""
        fields = current.unjournaled()
        if fields:
            self._journal(fields)

    def _why(self, current: Round, member: int) -> int:
        """The reason an untrusted worker is given `member` now (PROTOCOL §6.6)."""
        held = current.holders.get(member, set()) - current.panel.referees
        if len(held) >= current.target:
            return assignlog.DISPUTE  # enough holders: it wants another opinion
        return assignlog.LOST if member in current.lost else assignlog.UNASSIGNED

    def _give_referees(self, current: Round, added: dict[bytes, tuple[int, ...]]) -> None:
        """Members a referee must re-evaluate (spot-checked or disputed) go to connected referees, in the
        draw's order within their capacity; `added` collects them for the announcement."""
        needs = current.referee_needs()
        referees = self._connected(referees=True)
        if not needs or not referees:
            return
        load = {c.key: current.load(c.key) for c in referees}
        holders = {m: frozenset(current.holders.get(m, ())) for m in needs}
        chosen = assignment.picks(needs, holders, referees, load, current.panel.draw)
        spot = current.panel.spot
        current.give_later(Given(p.member, p.worker, p.eligible, assignlog.SPOT_CHECK if p.member in spot else assignlog.DISPUTE) for p in chosen)
        for key, members in assignment.by_worker(chosen).items():
            added[key] = tuple(sorted({*added.get(key, ()), *members}))

    def _move_retention(self, current: Round, connected: set[bytes]) -> bytes | None:
        """A new retention worker when the one asked is gone before reporting."""
        due = self._spec.retention_due(current.open.iteration)
        if not due or current.retention or not connected or current.retention_worker in connected:
            return None
        current.retention_worker = min(connected)
        return current.retention_worker
