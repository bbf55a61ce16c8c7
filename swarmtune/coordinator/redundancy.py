"""Redundant replicas: the majority reward of a member, who disagreed, and when a key is revoked."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping


@dataclass(frozen=True)
class Verdict:
    """The reward a member's replicas settle on (None: no strict majority), and the dissenters."""

    reward: float | None
    dissenters: frozenset[bytes]


def judge(replicas: Mapping[bytes, float], tolerance: float) -> Verdict:
    """Median rule: v = the lower median; it stands iff more than half the replicas lie within tolerance of v.

    A single replica stands alone. With two that disagree nothing stands, and the member needs a
    third opinion. Everyone farther than tolerance from a standing v dissents.
    """
    rewards = sorted(replicas.values())
    if not rewards:
        return Verdict(None, frozenset())
    median = rewards[(len(rewards) - 1) // 2]
    agreeing = {key for key, reward in replicas.items() if abs(reward - median) <= tolerance}
    if 2 * len(agreeing) <= len(rewards):
        return Verdict(None, frozenset())
    return Verdict(median, frozenset(replicas.keys() - agreeing))


def settled(replicas: Mapping[bytes, float], target: int, tolerance: float) -> bool:
    """A member is done once it has `target` replicas and they settle on a reward."""
    return len(replicas) >= target and judge(replicas, tolerance).reward is not None


def wanted(replicas: Mapping[bytes, float], target: int, tolerance: float) -> int:
    """Replicas a member should end up with: the target, or one more than it has while disputed."""
    if len(replicas) < target or judge(replicas, tolerance).reward is not None:
        return target
    return len(replicas) + 1


def strikes(verdicts: Iterable[Verdict]) -> Counter[bytes]:
    """Disagreements with a standing majority, per worker key."""
    return Counter(key for verdict in verdicts for key in verdict.dissenters)


def to_revoke(counts: Mapping[bytes, int], threshold: int, revoked: frozenset[bytes]) -> list[bytes]:
    """Keys at or past the strike threshold that are not revoked yet, in a stable order."""
    return sorted(key for key, count in counts.items() if count >= threshold and key not in revoked)


# A revocation for strikes names their count: the dissents that reached the threshold are not
# recorded (the revoked key's results stop counting in that iteration), so a restart reads it here.
_REVOKED_FOR_STRIKES = re.compile(r"disagreed with the majority of redundant replicas (\d+) times \(threshold \d+\)")


def revocation_reason(count: int, threshold: int) -> str:
    return f"disagreed with the majority of redundant replicas {count} times (threshold {threshold})"


def strikes_named(reason: str) -> int | None:
    """The strike count a revocation's reason names (None: revoked for another reason)."""
    match = _REVOKED_FOR_STRIKES.fullmatch(reason)
    return int(match.group(1)) if match else None
