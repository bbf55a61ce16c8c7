"""An iteration entry's coefficients, which it does not record: §3 applied to its recorded rewards
under the genesis job spec's shaping (PROTOCOL §3, §5.4)."""

from __future__ import annotations

from dataclasses import replace

from swarmtune import shaping
from swarmtune.entries import Genesis, Iteration, StoredEntry
from swarmtune.jobspec import JobSpecError, parse_job_spec


def rule_of(genesis: Genesis) -> shaping.Rule | None:
    """How the job's coefficients derive from its rewards (None when its job spec does not parse:
    the audit reports that)."""
    try:
        spec = parse_job_spec(genesis.job_spec)
    except JobSpecError:
        return None
    return shaping.Rule(spec.shaping, spec.alpha, spec.group_width)


def derived(body: Iteration, rule: shaping.Rule) -> tuple[int, ...]:
    """§3's coefficients of an iteration: its members' recorded rewards (those with a counted result) shaped by `rule`."""
    rewards = body.rewards
    counted = body.counted[0]
    rewarded = dict(enumerate(rewards)) if len(counted) == len(rewards) else {m: rewards[m] for m in counted}
    return shaping.member_coefficients(body.plan.population, rewarded, rule)


def with_coefficients(entry: StoredEntry, rule: shaping.Rule | None) -> StoredEntry:
    """An iteration entry with its coefficients derived; any other entry, or without a rule, as it is."""
    body = entry.entry.body
    if not isinstance(body, Iteration) or rule is None:
        return entry
    return replace(entry, entry=replace(entry.entry, body=body.with_coefficients(derived(body, rule))))
