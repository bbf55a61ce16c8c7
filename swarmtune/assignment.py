"""Who evaluates which member: capacity-weighted, replicas on distinct workers and operators, in the draw's order."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Collection, Iterable, Mapping, Sequence

from swarmtune.draw import keyed_order, member_rank


@dataclass(frozen=True)
class Candidate:
    """A connected worker that can take members."""

    key: bytes
    operator: str  # replicas of one member never share an operator
    capacity: int  # members per iteration it asked for


def effective_replicas(replicas: int, candidates: Sequence[Candidate]) -> int:
    """k, or fewer when fewer distinct operators are connected (a replica per operator at most)."""
    return max(1, min(replicas, len({c.operator for c in candidates})))


def quotas(slots: int, capacities: Sequence[int], cap: int | None = None) -> list[int]:
    """Split `slots` proportionally to capacities (largest remainder; ties to the earlier worker),
    never giving a worker more than its capacity or `cap`; what a capped worker cannot take goes
    to the others in proportion."""
    limits = [min(c, cap) if cap is not None else c for c in capacities]
    shares = [0] * len(capacities)
    open_ = [i for i, c in enumerate(capacities) if c > 0]
    left = min(slots, sum(limits))
    while left > 0 and open_:
        total = sum(capacities[i] for i in open_)
        exact = {i: left * capacities[i] for i in open_}  # share_i = exact_i / total, kept as integers
        step = {i: exact[i] // total for i in open_}
        extra = left - sum(step.values())
        for i in sorted(open_, key=lambda i: (-(exact[i] % total), i))[:extra]:
            step[i] += 1
        for i in open_:
            shares[i] += min(step[i], limits[i] - shares[i])
        left = min(slots, sum(limits)) - sum(shares)
        open_ = [i for i in open_ if shares[i] < limits[i]]
    return shares


def drawn(candidates: Sequence[Candidate], draw: bytes) -> list[Candidate]:
    """The candidates in the draw's order: who is preferred depends on nobody's speed or choice."""
    by_key = {c.key: c for c in candidates}
    return [by_key[key] for key in keyed_order(draw, by_key)]


def assign(members: Sequence[int], candidates: Sequence[Candidate], replicas: int, draw: bytes = b"") -> dict[bytes, tuple[int, ...]]:
    """Initial assignment of an iteration: member -> up to `replicas` workers of distinct operators.

    Each worker's share of the slots follows its capacity and never exceeds it; slots beyond the
    total capacity stay unassigned, and workers pull them as they finish (see `picks`). The slots,
    replica round by replica round and member by member, are dealt in the draw's order as one
    contiguous block per worker (its members are consecutive: one byte a member in its batches);
    where two workers of one operator would then share a member, the greedy deal (`_greedy`) instead.
    `members` are increasing. Returns worker key -> its members in member order.
    """
    order = drawn(candidates, draw)
    if not order or not members:
        return {}
    k = effective_replicas(replicas, order)
    capacities = [c.capacity for c in order]
    quota = quotas(len(members) * k, capacities, cap=len(members))  # a worker holds a member once
    spans = _spans(len(members), quota)
    if k == 1 or not _operators_clash(spans, order, len(members)):
        return {order[p].key: _held(members, first, count) for p, (first, count) in enumerate(spans) if count}
    taken = _greedy(members, quota, order, k)
    result: dict[bytes, list[int]] = {}
    for member in members:
        for position in taken.get(member, ()):
            result.setdefault(order[position].key, []).append(member)
    return {key: tuple(sorted(assigned)) for key, assigned in result.items()}


def _spans(n: int, quota: Sequence[int]) -> list[tuple[int, int]]:
    """Per position, (index of its first member, count) when the slots (slot s: a replica of member
    index s mod n) are dealt as consecutive blocks in preference order."""
    starts = accumulate(quota, initial=0)
    return [(start % n, count) for start, count in zip(starts, quota)]


def _intervals(first: int, count: int, n: int) -> list[tuple[int, int]]:
    """The member indices [a, b) a block covers: one interval, or two where it wraps to the first
    members (a block of at most n slots holds each member once)."""
    end = first + count
    return [(first, end)] if end <= n else [(first, n), (0, end - n)]


def _held(members: Sequence[int], first: int, count: int) -> tuple[int, ...]:
    """A block's members, in member order."""
    return tuple(chain.from_iterable(members[a:b] for a, b in sorted(_intervals(first, count, len(members)))))


def _operators_clash(spans: Sequence[tuple[int, int]], order: Sequence[Candidate], n: int) -> bool:
    """Whether two workers of one operator would hold a common member (only replicas can: k > 1)."""
    by_operator: dict[str, list[tuple[int, int]]] = {}
    for position, (first, count) in enumerate(spans):
        if count:
            by_operator.setdefault(order[position].operator, []).extend(_intervals(first, count, n))
    for intervals in by_operator.values():
        intervals.sort()
        if any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:])):
            return True
    return False


def _greedy(members: Sequence[int], quota: Sequence[int], order: Sequence[Candidate], k: int) -> dict[int, list[int]]:
    """member -> positions holding it: replica round by replica round, member by member, the most
    under-filled worker that neither holds the member nor shares an operator with its holders."""
    # Heap of (-remaining quota, preference position): the most under-filled worker first.
    heap = [(-q, position) for position, q in enumerate(quota) if q > 0]
    heapq.heapify(heap)
    taken: dict[int, list[int]] = {}
    for _ in range(k):
        for member in members:
            holders = taken.setdefault(member, [])
            operators = {order[p].operator for p in holders}
            skipped = []
            while heap and (heap[0][1] in holders or order[heap[0][1]].operator in operators):
                skipped.append(heapq.heappop(heap))
            if heap:
                remaining, position = heapq.heappop(heap)
                holders.append(position)
                if remaining + 1 < 0:
                    heapq.heappush(heap, (remaining + 1, position))
            for item in skipped:
                heapq.heappush(heap, item)
    _fill_short(members, taken, {position: -remaining for remaining, position in heap}, order, k)
    return taken


def _fill_short(members: Sequence[int], taken: dict[int, list[int]], spare: dict[int, int], order: Sequence[Candidate], k: int) -> None:
    """Where the greedy pass left members short of holders while workers still have quota (all of
    those already hold the short members, or share their operators), move members along augmenting
    paths: a worker hands one member on to take another, and the last worker takes one from its quota."""
    while spare:
        path = next((p for m in members if len(taken[m]) < k and (p := _augmenting_path(m, taken, spare, order))), None)
        if path is None:
            return
        for position, takes, drops in path:
            if drops is not None:
                taken[drops].remove(position)
            taken[takes].append(position)
        last = path[0][0]
        spare[last] -= 1
        if not spare[last]:
            del spare[last]


def _augmenting_path(
    start: int, taken: Mapping[int, list[int]], spare: Mapping[int, int], order: Sequence[Candidate]
) -> list[tuple[int, int, int | None]] | None:
    """(worker position, member it takes, member it hands on or None) steps that give `start` one more
    holder; the first step's worker takes from its spare quota. Breadth first, so the shortest path."""
    held: dict[int, list[int]] = {}
    for member, holders in taken.items():
        for position in holders:
            held.setdefault(position, []).append(member)
    came: dict[int, tuple[int, int] | None] = {start: None}  # member -> (worker handing it on, member that worker takes)
    queue = deque([start])
    while queue:
        member = queue.popleft()
        link = came[member]
        staying = [p for p in taken[member] if link is None or p != link[0]]
        operators = {order[p].operator for p in staying}
        for position, candidate in enumerate(order):
            if position in taken[member] or candidate.operator in operators:
                continue
            if spare.get(position, 0) > 0:
                steps: list[tuple[int, int, int | None]] = [(position, member, None)]
                while (link := came[member]) is not None:
                    steps.append((link[0], link[1], member))
                    member = link[1]
                return steps
            for handed in held.get(position, ()):
                if handed not in came:
                    came[handed] = (position, member)
                    queue.append(handed)
    return None


@dataclass(frozen=True)
class Pick:
    """One extra holder chosen for a member, with every worker that could have taken it then."""

    member: int
    worker: bytes
    eligible: frozenset[bytes]  # every worker that could have taken it then


def first_ranked(draw: bytes, member: int, eligible: Collection[bytes]) -> bytes:
    """The worker the draw prefers for an extra replica of `member` among `eligible` (not empty)."""
    return min(eligible, key=lambda key: (member_rank(draw, member, key), key))


def picks(
    needs: Mapping[int, int],
    holders: Mapping[int, frozenset[bytes]],
    candidates: Sequence[Candidate],
    load: Mapping[bytes, int],
    draw: bytes = b"",
    disputed: Collection[int] = frozenset(),
) -> tuple[Pick, ...]:
    """Extra holders for members that need them (unassigned, a straggler's, a lost worker's, a disputed one's).

    `needs` is member -> extra holders wanted; a new holder never holds the member already and never
    shares an operator with its holders. Among those eligible the draw decides (`member_rank`), not
    who answered first: a fast worker is as likely as any to be chosen. A holder needs spare capacity
    (`load` is what it still owes) except for a `disputed` member, whose extra opinion would otherwise
    go to whoever is idle - the fastest, which a liar can always be. Members no candidate can take are
    left out: the caller retries as workers finish or come.
    """
    by_key = {c.key: c for c in candidates}
    spare = {c.key: c.capacity - load.get(c.key, 0) for c in candidates}
    out: list[Pick] = []
    for member in sorted(needs):
        for _ in range(needs[member]):
            held = holders.get(member, frozenset()) | {p.worker for p in out if p.member == member}
            operators = {by_key[key].operator for key in held if key in by_key}
            eligible = frozenset(
                key for key, room in spare.items()
                if key not in held and by_key[key].operator not in operators and (room > 0 or member in disputed)
            )  # fmt: skip
            if not eligible:
                break
            chosen = first_ranked(draw, member, eligible)
            spare[chosen] -= 1
            out.append(Pick(member, chosen, eligible))
    return tuple(out)


def by_worker(chosen: Iterable[Pick]) -> dict[bytes, tuple[int, ...]]:
    """The picks as worker key -> its extra members, in member order."""
    added: dict[bytes, list[int]] = {}
    for pick in chosen:
        added.setdefault(pick.worker, []).append(pick.member)
    return {key: tuple(sorted(members)) for key, members in added.items()}
