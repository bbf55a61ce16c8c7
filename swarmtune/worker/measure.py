"""What a worker measures and signs: a member's reward on the iteration's prompts, retention figures."""

from __future__ import annotations

import math

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import entries, identity
from swarmtune.backends.base import Backend
from swarmtune.entries import RetentionReport, Signed
from swarmtune.jobspec import JobSpec
from swarmtune.seeds import MemberNoise
from swarmtune.tasks.base import Example, Task, columns_of, sample_indices
from swarmtune.worker.site import Site


def evaluation_batch(pending: list[MemberNoise], lowrank: bool) -> list[MemberNoise]:
    """Members for one evaluation call: a low-rank population batches whole; dense goes member by member
    (results stream out sooner, and SIGTERM waits for one member at most)."""
    return pending if lowrank else pending[:1]


def member_rewards(site: Site, iteration: int, members: list[MemberNoise]) -> list[float] | None:
    """Rewards of members of iteration t on their groups' prompts (one batched evaluation), or None once
    the replica has moved past t's center."""
    if site.replica.iteration != iteration - 1:
        return None
    spec, task = site.job.spec, site.job.task
    return site.backend().evaluate_each(members, member_prompts(task, spec, iteration, members), task.reward, spec.max_new_tokens)


def center_retention(site: Site, iteration: int) -> tuple[tuple[str, float], ...] | None:
    """Retention figures of iteration t's center, or None once the replica has moved past it."""
    if site.replica.iteration != iteration - 1 or site.job.retention is None:
        return None
    return retention_figures(site.backend(), site.job.retention, site.job.spec)


def prompt_batch(task: Task, spec: JobSpec, iteration: int, group: int = 0) -> list[Example]:
    """Group g's prompts of iteration t: the same for every member of g and every site, from (job seed, t, g)."""
    train = task.train()
    return [train[i] for i in sample_indices(spec.job_seed, iteration, len(train), spec.member_prompt_count, group=group)]


def member_prompts(task: Task, spec: JobSpec, iteration: int, members: list[MemberNoise]) -> list[list[Example]]:
    """Each member's prompts of iteration t: its group's batch (one batch for the whole population by default)."""
    groups = {g: prompt_batch(task, spec, iteration, g) for g in {spec.group_of(m.member) for m in members}}
    return [groups[spec.group_of(m.member)] for m in members]


def retention_figures(backend: Backend, task: Task, spec: JobSpec) -> tuple[tuple[str, float], ...]:
    """The center model's mean reward on the retention task's held-out set, named after the task."""
    examples = task.held_out()
    if not examples:
        raise ValueError(f"retention task {task.name!r} has no held-out examples; give it a held-out split")
    prompts = [example.prompt for example in examples]
    # Batches of the job's prompt batch size: the memory evaluation is already sized for.
    step = spec.prompts_per_iteration
    completions = [c for i in range(0, len(prompts), step) for c in backend.generate(prompts[i : i + step], spec.max_new_tokens)]
    rewards = task.reward(prompts, completions, **columns_of(examples))
    return ((task.name, math.fsum(rewards) / len(rewards)),)


def sign_retention(
    key: Ed25519PrivateKey, spec: JobSpec, iteration: int, head_hash: bytes, figures: tuple[tuple[str, float], ...]
) -> Signed[RetentionReport]:
    record = RetentionReport(spec.job_id, iteration, head_hash, identity.public_key_bytes(key), figures)
    return entries.sign_record(key, record)
