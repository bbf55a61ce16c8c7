"""Re-derive what the coordinator judged: spot checks from the draw, each member's verdict, who was
assigned which member and why, strikes behind revocations."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from swarmtune import assignlog, draw, identity
from swarmtune.redundancy import revocation_reason, strikes, strikes_named, verdicts_of
from swarmtune.entries import ROLE_REFEREE, Admission, Body, Iteration, Revocation
from swarmtune.jobspec import JobSpec


def spot_checked(body: Iteration, spec: JobSpec, referees: frozenset[bytes]) -> frozenset[int]:
    """The members the draw sent to a referee whatever their replicas said (none without referees)."""
    if not referees or not body.draw:
        return frozenset()
    return draw.spot_checks(body.draw, list(range(body.plan.population)), spec.spot_check)


def verdict_problem(body: Iteration, spec: JobSpec, referees: frozenset[bytes]) -> str | None:
    """Why a recorded reward is not the verdict its recorded replicas give under the job's rules."""
    spot = spot_checked(body, spec, referees)
    # Without referees a member with one replica settles on it: only those with several can differ.
    judged = body.results if referees else body.replicated()
    verdicts = verdicts_of(judged, frozenset(), spec.redundancy_tolerance, referees, spot)
    for member, verdict in sorted(verdicts.items()):
        reward = body.rewards[member]
        if verdict.reward is None:
            why = "a spot check no referee answered" if member in spot else "replicas that do not settle"
            return f"member {member} is recorded with {why}"
        if verdict.reward != reward:
            return f"member {member}'s reward is {reward}; its replicas settle on {verdict.reward}"
    return None


@dataclass
class Judging:
    """The referees and strike counts as the ledger stands, fed entry by entry (as the coordinator counts)."""

    referees: set[bytes] = field(default_factory=set)
    revoked: set[bytes] = field(default_factory=set)
    strikes: Counter[bytes] = field(default_factory=Counter)

    @property
    def active_referees(self) -> frozenset[bytes]:
        return frozenset(self.referees - self.revoked)

    def problem(self, body: Body, spec: JobSpec) -> str | None:
        """Why `body` is not what the rules give from the entries before it; then account for it."""
        if isinstance(body, Iteration):
            referees = self.active_referees
            spot = spot_checked(body, spec, referees)
            problem = verdict_problem(body, spec, referees) or assignlog.assignment_problem(
                body, spec.redundancy, spot, frozenset(self.referees), frozenset(self.revoked)
            )
            verdicts = verdicts_of(body.replicated(), frozenset(), spec.redundancy_tolerance, frozenset(self.referees))
            self.strikes.update(strikes(verdicts.values()))
            return problem
        if isinstance(body, Admission) and body.role == ROLE_REFEREE:
            self.referees.add(body.worker_key)
        if isinstance(body, Revocation):
            self.revoked.add(body.worker_key)
            return self._revocation_problem(body, spec)
        return None

    def _revocation_problem(self, body: Revocation, spec: JobSpec) -> str | None:
        named = strikes_named(body.reason)
        if named is None:
            return None
        who = identity.fingerprint(body.worker_key)
        recorded = self.strikes[body.worker_key]
        self.strikes[body.worker_key] = named
        # The dissents of the close that revoked a key are not recorded: its count may exceed the recorded ones.
        if named < max(spec.revoke_after, recorded):
            return f"worker {who} revoked for {named} strikes; the threshold is {spec.revoke_after} and the ledger records {recorded}"
        refereed = bool(self.active_referees)
        if body.reason != revocation_reason(named, spec.revoke_after, refereed):
            judge = "referees" if refereed else "no referee"
            return f"worker {who}'s revocation reason does not match the job's rules with {judge} admitted"
        return None
