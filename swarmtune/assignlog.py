"""Who evaluated which member and why: an iteration entry's opening facts and later assignments,
encoded compactly, checked for form, and re-derived (PROTOCOL §6.6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from swarmtune.assignment import Candidate, Pick, assign, first_ranked
from swarmtune.entries import Assignment, Iteration
from swarmtune.wire import ledger_pb2 as pb

Reason = pb.Assignment.Reason
UNASSIGNED, LOST, STRAGGLER, DISPUTE, SPOT_CHECK = Reason.UNASSIGNED, Reason.LOST, Reason.STRAGGLER, Reason.DISPUTE, Reason.SPOT_CHECK
REASONS = frozenset((UNASSIGNED, LOST, STRAGGLER, DISPUTE, SPOT_CHECK))


@dataclass(frozen=True)
class Given(Pick):
    """A later assignment with its reason, workers named by key (what the coordinator keeps until the close)."""

    reason: int


# ---- encoding -------------------------------------------------------------------------------


def operator_ranks(operators: Sequence[str]) -> tuple[int, ...]:
    """Per candidate, the index of the first candidate of the same operator; () when all are distinct."""
    first: dict[str, int] = {}
    ranks = tuple(first.setdefault(operator, i) for i, operator in enumerate(operators))
    return () if len(first) == len(operators) else ranks


def opening_candidates(candidates: Sequence[bytes], capacities: Sequence[int], operators: Sequence[int]) -> list[Candidate]:
    """The candidates as the opening assignment saw them (operators only compare, so their rank names them)."""
    ranks = operators or range(len(candidates))
    return [Candidate(key, str(rank), capacity) for key, capacity, rank in zip(candidates, capacities, ranks)]


def bitmap(indices: Collection[int], size: int) -> bytes:
    """Bit i of the result (byte i // 8, bit i % 8) is set for each i in `indices`."""
    out = bytearray((size + 7) // 8)
    for i in indices:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def bits(data: bytes) -> list[int]:
    """The indices set in a `bitmap`, ascending."""
    return [8 * n + b for n, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1]


def encode(given: Sequence[Given], candidates: Sequence[bytes], named: Sequence[bytes] = ()) -> tuple[tuple[bytes, ...], tuple[Assignment, ...]]:
    """(others, assignments): workers outside `candidates` get indices after them, in first appearance
    in the assignments, then in `named` (the entry's batch workers: a batch names its worker by index)."""
    index = {key: i for i, key in enumerate(candidates)}
    for record in given:
        for key in (*sorted(record.eligible), record.worker):
            index.setdefault(key, len(index))
    for key in named:
        index.setdefault(key, len(index))
    others = tuple(list(index)[len(candidates) :])
    size = len(index)
    return others, tuple(Assignment(g.member, index[g.worker], g.reason, bitmap([index[k] for k in g.eligible], size)) for g in given)


def decode(candidates: Sequence[bytes], others: Sequence[bytes], assignments: Sequence[Assignment]) -> tuple[Given, ...]:
    """The assignments with workers named by key (they must be well-formed: `form_problem`)."""
    workers = (*candidates, *others)
    return tuple(Given(a.member, workers[a.worker], frozenset(workers[i] for i in bits(a.eligible)), a.reason) for a in assignments)


# ---- form (ledger verification) ---------------------------------------------------------------


def form_problem(body: Iteration) -> str | None:
    """Why the entry's opening facts or later assignments are malformed (PROTOCOL §6.6)."""
    problem = opening_problem(body.candidates, body.capacities, body.operators)
    if problem:
        return problem
    n = len(body.candidates)
    if len(set(body.others)) != len(body.others) or set(body.others) & set(body.candidates):
        return "others repeat a worker or a candidate"
    size = n + len(body.others)
    for i, a in enumerate(body.assignments):
        problem = assignment_form(a, size, body.plan.population)
        if problem:
            return f"assignment {i}: {problem}"
    return None


def opening_problem(candidates: Sequence[bytes], capacities: Sequence[int], operators: Sequence[int]) -> str | None:
    """Why capacities or operators do not describe the candidates."""
    n = len(candidates)
    if len(capacities) != n:
        return f"{len(capacities)} capacities recorded for {n} candidates"
    if operators and (len(operators) != n or any(r > i or operators[r] != r for i, r in enumerate(operators))):
        return "operators are not, per candidate, the index of the first candidate of its operator"
    return None


def assignment_form(a: Assignment, size: int, population: int) -> str | None:
    if a.reason not in REASONS:
        return f"reason {a.reason} is not a known reason code"
    if a.member >= population:
        return f"member {a.member} is beyond the population {population}"
    if len(a.eligible) != (size + 7) // 8 or (size % 8 and a.eligible[-1] >> (size % 8)):
        return f"the eligible bitmap is not {size} bits"
    if a.worker >= size or not a.eligible[a.worker // 8] >> (a.worker % 8) & 1:
        return f"worker {a.worker} is not among the eligible"
    return None


# ---- re-derivation (audit) ----------------------------------------------------------------------


def initial(body: Iteration, redundancy: int) -> dict[bytes, tuple[int, ...]]:
    """The opening assignment the entry's draw, candidates and capacities give (worker -> members)."""
    candidates = opening_candidates(body.candidates, body.capacities, body.operators)
    return assign(range(body.plan.population), candidates, redundancy, body.draw)


def assignment_problem(body: Iteration, redundancy: int, spot: Collection[int], referees: Collection[bytes], revoked: Collection[bytes]) -> str | None:
    """The first later assignment the draw or its reason does not justify, or the first counted
    replica no assignment covers (PROTOCOL §6.6); an entry without a draw records none."""
    if not body.draw:
        return None
    opening = initial(body, redundancy)
    given = decode(body.candidates, body.others, body.assignments)
    problem = _given_problem(body, opening, given, redundancy, spot, referees, revoked) if given else None
    if problem:
        return problem
    later = {(g.member, g.worker) for g in given}
    for recorded in body.batches:  # most counted replicas are the opening's: checked a batch at a time
        key = recorded.batch.worker_key
        counted, held = recorded.counted()[0], opening.get(key, ())
        if counted == held:  # the common case: a worker answered its opening block in one batch
            continue
        stray = [m for m in set(counted).difference(held) if (m, key) not in later]
        if stray:
            return f"member {min(stray)}: the counted replica of worker {key.hex()[:16]} was never assigned to it"
    return None


def _given_problem(
    body: Iteration,
    opening: Mapping[bytes, Sequence[int]],
    given: Sequence[Given],
    redundancy: int,
    spot: Collection[int],
    referees: Collection[bytes],
    revoked: Collection[bytes],
) -> str | None:
    """The first later assignment whose worker is not the draw's first among its eligible, or whose reason does not fit."""
    members = {g.member for g in given}
    holders: dict[int, set[bytes]] = {m: set() for m in members}
    for key, held in opening.items():
        for member in members.intersection(held):
            holders[member].add(key)
    counted: dict[int, dict[bytes, float]] = {m: {} for m in members}
    for recorded in body.batches:
        for member, reward in zip(*recorded.counted()):
            if member in counted:
                counted[member][recorded.batch.worker_key] = reward
    for i, record in enumerate(given):
        earlier = holders[record.member]
        problem = _rank_problem(body.draw, record) or _reason_problem(record, earlier, counted[record.member], redundancy, spot, referees, revoked)
        if problem:
            return f"assignment {i} (member {record.member}): {problem}"
        earlier.add(record.worker)
    return None


def _rank_problem(draw: bytes, given: Given) -> str | None:
    first = first_ranked(draw, given.member, given.eligible)
    return None if first == given.worker else f"the draw ranks {first.hex()[:16]} first among the eligible, not {given.worker.hex()[:16]}"


def _reason_problem(
    given: Given,
    earlier: set[bytes],
    counted: Mapping[bytes, float],
    redundancy: int,
    spot: Collection[int],
    referees: Collection[bytes],
    revoked: Collection[bytes],
) -> str | None:
    """Each reason's rule, as far as the entry shows it (who had answered when is not recorded)."""
    disagree = len(set(counted.values())) > 1
    if given.reason == UNASSIGNED:
        untrusted = len(earlier - set(referees))
        return None if untrusted < redundancy else f"unassigned, but it had {untrusted} holders for a redundancy of {redundancy}"
    if given.reason == LOST:  # the holder that left may come back and take it again
        return None if earlier else "a holder left it, but it had none"
    if given.reason == STRAGGLER:
        if not earlier - {given.worker}:
            return "taken from a straggler, but it had no other holder"
        # A member settles once enough replicas agree and refuses the rest, so unless its replicas
        # disagree or waited for a referee, some holder's replica is not counted: the straggler's.
        undelivered = any(key not in counted for key in earlier | {given.worker})
        refereed = not set(counted).isdisjoint(referees)
        return None if undelivered or disagree or refereed else "taken from a straggler, but every holder's replica is counted and they agree"
    if given.reason == DISPUTE:
        unsettled = not counted
        return None if unsettled or disagree or earlier & set(revoked) else "disputed, but its counted replicas agree"
    if given.member not in spot:
        return "spot-checked, but the draw does not spot-check it"
    return None if given.worker in referees else "spot-checked by a worker that is not a referee"
