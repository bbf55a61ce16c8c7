"""A job's head record against its stream: how they differ, and what the operator can do about it."""

from __future__ import annotations

from dataclasses import dataclass

from swarmtune import entries


@dataclass(frozen=True)
class Head:
    """A job's head record in Redis: the index and hash of its last entry."""

    index: int
    hash: bytes


def restore_advice(job: str) -> str:
    """What an operator can do about a job whose stream cannot be trusted as it is."""
    return (
        f"restore the job from an exported ledger file: with no coordinator of it running, delete the keys "
        f"swarmtune:{{{job}}}:ledger, :head and :open, then `swarmtune ledger import FILE`"
    )


def head_advice(job: str) -> str:
    """What an operator can do about a head record that disagrees with its stream."""
    return (
        f"if no coordinator of the job is running, `swarmtune ledger repair-head --job {job}` (same Redis) "
        f"rebuilds the head record from the stream, once the whole stream verifies; or {restore_advice(job)}"
    )


def id_problem(job: str, entry_id: str, index: int) -> str | None:
    """Why stream id `entry_id` cannot hold entry `index` (None: it is `<index>-1`, as appends write it)."""
    if entry_id == f"{index}-1":
        return None
    return (
        f"the stream of job {job} holds id {entry_id} where entry {index} belongs (id {index}-1): it was "
        f"written by something else than swarmtune's append; {restore_advice(job)}"
    )


def head_problem(job: str, head: Head | None, count: int, last: bytes | None) -> str | None:
    """How a head record differs from a stream of `count` entries ending with `last` (None: they agree)."""
    if head is None:
        return None if count == 0 else f"job {job} has no head record, but its stream holds {count} entries (0 to {count - 1})"
    if last is None:
        return f"the head record of job {job} says its last entry is {head.index}, but its stream holds no entry"
    if head.index != count - 1:
        return f"the head record of job {job} says its last entry is {head.index}, but its stream's last entry is {count - 1}"
    if head.hash != entries.entry_hash(last):
        return (
            f"the head record of job {job} names entry {head.index} with hash {head.hash.hex()[:16]}, but the "
            f"stream's entry {count - 1} has hash {entries.entry_hash(last).hex()[:16]}"
        )
    return None
