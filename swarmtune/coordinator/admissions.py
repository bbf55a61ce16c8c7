"""Who may take part: the ledger's allowlist, open enrollment, the operator's --admit and --referee keys.

Admissions decide; the job records the Admission entries they ask for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable

from swarmtune import identity
from swarmtune.coordinator.limits import Refused
from swarmtune.entries import ROLE_REFEREE, Admission


@dataclass(frozen=True)
class Admit:
    """The worker may join, as `operator`, once `entry` (if any) is in the ledger."""

    operator: str
    entry: Admission | None = None


@dataclass(frozen=True)
class Admissions:
    """The job's admission rules: without open enrollment, only keys the ledger admits join."""

    open_enrollment: bool

    def decide(self, key: bytes, declared_operator: str, admitted: Collection[bytes], revoked: Collection[bytes]) -> Admit:
        """How a worker that proved `key` joins; raises Refused if it may not (revoked keys never may)."""
        who = identity.fingerprint(key)
        if key in revoked:
            raise Refused("PERMISSION_DENIED", f"worker {who} is revoked in this job's ledger")
        operator = declared_operator or who  # no declared operator: the worker is its own operator
        if key in admitted:
            return Admit(operator)
        if not self.open_enrollment:
            raise Refused("PERMISSION_DENIED", f"worker {who} is not admitted; ask the operator to --admit {key.hex()}")
        return Admit(operator, Admission(key, "open enrollment", operator))


def by_operator(keys: Iterable[bytes], admitted: Collection[bytes], revoked: Collection[bytes]) -> list[Admission]:
    """Admission entries for the operator's --admit keys that the ledger does not admit yet, once
    each; revoked keys stay revoked."""
    return [
        Admission(key, "admitted by the operator (--admit)", "")
        for key in dict.fromkeys(keys)
        if key not in admitted and key not in revoked
    ]


def as_referees(keys: Iterable[bytes], referees: Collection[bytes], revoked: Collection[bytes]) -> list[Admission]:
    """Admission entries with the referee role for the operator's --referee keys (a key already
    admitted as a worker is promoted), once each; revoked keys stay revoked."""
    return [
        Admission(key, "admitted as a referee by the operator (--referee)", "", ROLE_REFEREE)
        for key in dict.fromkeys(keys)
        if key not in referees and key not in revoked
    ]
