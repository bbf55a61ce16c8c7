"""The iteration lifecycle: opening iteration t from the job seed, deadlines, quorum and the last iteration."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from swarmtune.jobspec import JobSpec
from swarmtune.seeds import NoisePlan


@dataclass(frozen=True)
class OpenIteration:
    """Iteration t while it collects results: its members, the head results bind to, its timing."""

    iteration: int
    head_hash: bytes
    plan: NoisePlan
    opened_ms: int
    deadline_ms: int
    straggle_ms: int  # from here on, idle workers also take members whose holders have not answered

    @property
    def numbers(self) -> range:
        """The member numbers 0..population-1 (results name members; their seeds are the workers' to derive)."""
        return range(self.plan.population)


def deadline_span_ms(spec: JobSpec) -> int:
    return max(1, round(spec.deadline_seconds * 1000))


def open_iteration(spec: JobSpec, iteration: int, head_hash: bytes, now_ms: int) -> OpenIteration:
    """Iteration t's members are a pure function of (job seed, t): every site derives the same seeds."""
    return OpenIteration(
        iteration=iteration,
        head_hash=head_hash,
        plan=NoisePlan(spec.job_seed, spec.population, spec.antithetic),
        opened_ms=now_ms,
        deadline_ms=now_ms + deadline_span_ms(spec),
        straggle_ms=now_ms + deadline_span_ms(spec) // 2,
    )


def extend_deadline(open_iteration: OpenIteration, spec: JobSpec, now_ms: int) -> OpenIteration:
    """A late iteration without quorum: a new full span from now, and stragglers' members up for grabs now."""
    return replace(open_iteration, deadline_ms=now_ms + deadline_span_ms(spec), straggle_ms=now_ms)


def quorum_members(spec: JobSpec) -> int:
    """Members that need a settled reward before a late iteration may close."""
    # The epsilon keeps 0.9 × 30 = 27.000000000000004 from asking for 28.
    return math.ceil(spec.quorum * spec.population - 1e-9)


def may_close(spec: JobSpec, settled: int, now_ms: int, deadline_ms: int) -> bool:
    """Every member settled, or the deadline passed with a quorum settled."""
    return settled >= spec.population or (now_ms >= deadline_ms and settled >= quorum_members(spec))


def encode_open_meta(open_iteration: OpenIteration) -> bytes:
    """What Redis keeps to resume the open iteration (members are re-derived from the spec)."""
    return json.dumps(
        {"iteration": open_iteration.iteration, "head_hash": open_iteration.head_hash.hex(), "opened_ms": open_iteration.opened_ms}
    ).encode()


def resume_iteration(spec: JobSpec, meta: bytes, now_ms: int) -> OpenIteration:
    """The open iteration a previous coordinator persisted, with a fresh deadline for reconnecting workers."""
    record = json.loads(meta)
    resumed = open_iteration(spec, int(record["iteration"]), bytes.fromhex(record["head_hash"]), now_ms)
    return replace(resumed, opened_ms=int(record["opened_ms"]))
