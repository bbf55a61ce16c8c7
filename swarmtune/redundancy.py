"""Redundant replicas: the reward a member settles on (a referee's, else the majority's), who
disagreed, and when a key is revoked."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping

from swarmtune.batches import MemberResult


@dataclass(frozen=True)
class Verdict:
    """The reward a member's replicas settle on (None: no strict majority), and the dissenters."""

    reward: float | None
    dissenters: frozenset[bytes]


def judge(replicas: Mapping[bytes, float], tolerance: float, referees: Collection[bytes] = frozenset(), spot: bool = False) -> Verdict:
    """The reward a member's replicas settle on, under the job's `referees` (trusted keys; none: majority rule).

    A referee's replica settles the member (the lower median of several referees'), and every other
    replica farther than tolerance from it dissents. Where the job has referees, untrusted replicas
    alone settle a member only when they all agree and it is not `spot`-checked, and then nobody
    dissents: strikes come from referees only. Without referees, the median rule: v = the lower
    median stands iff more than half the replicas lie within tolerance of v; everyone farther dissents.
    """
    if len(replicas) == 1 and not referees:  # most members: one replica, majority rule
        (only,) = replicas.values()
        return Verdict(only, frozenset())
    refereed = sorted(reward for key, reward in replicas.items() if key in referees)
    if refereed:
        verdict = refereed[(len(refereed) - 1) // 2]
        return Verdict(verdict, frozenset(k for k, r in replicas.items() if k not in referees and abs(r - verdict) > tolerance))
    rewards = sorted(replicas.values())
    if not rewards:
        return Verdict(None, frozenset())
    median = rewards[(len(rewards) - 1) // 2]
    if referees:
        agreed = not spot and rewards[-1] - rewards[0] <= tolerance
        return Verdict(median if agreed else None, frozenset())
    agreeing = {key for key, reward in replicas.items() if abs(reward - median) <= tolerance}
    if 2 * len(agreeing) <= len(rewards):
        return Verdict(None, frozenset())
    return Verdict(median, frozenset(replicas.keys() - agreeing))


def replicas_by_member(results: Iterable[MemberResult], revoked: frozenset[bytes]) -> dict[int, dict[bytes, float]]:
    """member -> worker key -> reward, leaving out revoked workers (their results stop counting)."""
    replicas: dict[int, dict[bytes, float]] = {}
    for result in results:
        if result.worker_key not in revoked:
            replicas.setdefault(result.member, {})[result.worker_key] = result.reward
    return replicas


def verdicts_of(
    results: Iterable[MemberResult], revoked: frozenset[bytes], tolerance: float, referees: Collection[bytes] = frozenset(), spot: Collection[int] = frozenset()
) -> dict[int, Verdict]:
    replicas = replicas_by_member(results, revoked)
    return {member: judge(got, tolerance, referees, member in spot) for member, got in replicas.items()}


def settled(replicas: Mapping[bytes, float], target: int, tolerance: float, referees: Collection[bytes] = frozenset(), spot: bool = False) -> bool:
    """A member is done once a referee answered it, or it has `target` replicas that settle on a reward."""
    if referees and any(key in referees for key in replicas):
        return True
    if len(replicas) < target:
        return False
    # One replica, majority rule: it stands (checked per accepted result, so kept cheap).
    return (len(replicas) == 1 and not referees) or judge(replicas, tolerance, referees, spot).reward is not None


def wanted(replicas: Mapping[bytes, float], target: int, tolerance: float, referees: Collection[bytes] = frozenset()) -> int:
    """Untrusted replicas a member should end up with: the target, or (without referees, where a
    majority decides) one more than it has while disputed."""
    if referees or len(replicas) < target or judge(replicas, tolerance).reward is not None:
        return target
    return len(replicas) + 1


def needs_referee(replicas: Mapping[bytes, float], tolerance: float, referees: Collection[bytes], spot: bool) -> bool:
    """A referee must re-evaluate the member: it is spot-checked or its replicas disagree, and no referee answered."""
    if not referees or any(key in referees for key in replicas):
        return False
    rewards = replicas.values()
    return spot or (len(replicas) >= 2 and max(rewards) - min(rewards) > tolerance)


def strikes(verdicts: Iterable[Verdict]) -> Counter[bytes]:
    """Disagreements with a standing majority, per worker key."""
    return Counter(key for verdict in verdicts for key in verdict.dissenters)


def to_revoke(counts: Mapping[bytes, int], threshold: int, revoked: frozenset[bytes]) -> list[bytes]:
    """Keys at or past the strike threshold that are not revoked yet, in a stable order."""
    return sorted(key for key, count in counts.items() if count >= threshold and key not in revoked)


def within_minority(revoking: Collection[bytes], operators: Mapping[bytes, str]) -> bool:
    """Without referees a majority can be wrong: a close may revoke keys of fewer than half of the
    active operators (`operators`: active key -> its operator) at once, never more."""
    return 2 * len({operators.get(key, key.hex()) for key in revoking}) < len(set(operators.values()))


# A revocation for strikes names their count: the dissents that reached the threshold are not
# recorded (the revoked key's results stop counting in that iteration), so a restart reads it here.
_REVOKED_FOR_STRIKES = re.compile(r"disagreed with (?:the majority of redundant replicas|a referee) (\d+) times \(threshold \d+\)")


def revocation_reason(count: int, threshold: int, refereed: bool = False) -> str:
    judge_ = "a referee" if refereed else "the majority of redundant replicas"
    return f"disagreed with {judge_} {count} times (threshold {threshold})"


def strikes_named(reason: str) -> int | None:
    """The strike count a revocation's reason names (None: revoked for another reason)."""
    match = _REVOKED_FOR_STRIKES.fullmatch(reason)
    return int(match.group(1)) if match else None
