"""The job spec: a TOML file, validated into one frozen record; its exact bytes go in genesis."""

from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from swarmtune.entries import check_job_id
from swarmtune.shaping import SHAPING_METHODS

if TYPE_CHECKING:
    from swarmtune.noise import NoiseConfig

# The same choices as swarmtune.noise (a test pins them equal): repeated here so that reading a job
# spec never imports torch, which the coordinator does not otherwise need.
NOISE_FAMILIES = ("dense", "lowrank")
NOISE_DISTRIBUTIONS = ("rademacher", "gaussian")
LOWRANK_OTHERS = ("frozen", "dense")
MAX_POPULATION = 100_000
MAX_JOB_SEED = (1 << 64) - 1


class JobSpecError(ValueError):
    """A job spec that cannot be used; the message names the field and what is allowed."""


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines a job. Defaults follow Qiu et al. (N=30, σ=1e-3, α=5e-4, z-score)."""

    job_id: str
    model: str  # a model directory, a hub id, or builtin:tiny
    task: str  # a registered task name or module:function
    job_seed: int = 0
    iterations: int = 100
    task_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    prompts_per_iteration: int = 32
    prompts_per_member: int | None = None  # None: prompts_per_iteration
    max_new_tokens: int = 64
    population: int = 30
    sigma: float = 1e-3
    alpha: float = 5e-4
    shaping: str = "zscore"
    antithetic: bool = False
    group_size: int | None = None  # None: one group, the whole population
    anchored_decay: float = 0.0  # strength λ of the exact pull toward the base state
    noise_family: str = "dense"
    distribution: str = "gaussian"
    rank: int = 1
    lowrank_others: str = "frozen"
    deadline_seconds: float = 600.0
    quorum: float = 1.0  # fraction of members that need a reward before the iteration may close
    redundancy: int = 1  # replicas per member, each on a distinct worker and operator
    redundancy_tolerance: float = 1e-6  # replicas within this absolute distance agree
    revoke_after: int = 3  # disagreements with the majority before a worker key is revoked
    attest_every: int = 1  # iterations between worker state attestations (0: never)
    checkpoint_every: int = 0  # iterations between checkpoint entries (0: never); a multiple of attest_every
    checkpoint_quorum: int = 2  # distinct workers attesting the same state hash for a checkpoint entry
    spot_check: float = 0.0  # fraction of members also re-evaluated by a referee (0: none)
    retention_task: str = ""  # held-out task measured on the center model ("" : none)
    retention_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    retention_every: int = 0  # iterations between retention measurements (0: never)
    retention_alert_threshold: float = 0.0  # alert when the figure drops this far below its first value (0: off)
    pause_on_alert: bool = False
    spec_bytes: bytes = field(default=b"", compare=False, repr=False)  # the TOML as given

    @property
    def spec_sha256(self) -> bytes:
        return hashlib.sha256(self.spec_bytes).digest()

    @property
    def noise(self) -> NoiseConfig:
        from swarmtune.noise import NoiseConfig

        return NoiseConfig(family=self.noise_family, distribution=self.distribution, rank=self.rank)

    @property
    def group_width(self) -> int:
        """Members per group: those sharing prompts and normalised together by shaping (PROTOCOL §3)."""
        return self.group_size or self.population

    @property
    def member_prompt_count(self) -> int:
        """Prompts each member is evaluated on in one iteration."""
        return self.prompts_per_member or self.prompts_per_iteration

    def group_of(self, member: int) -> int:
        """Member m's group: m // group width (group 0 alone, the whole population, by default)."""
        return member // self.group_width

    def retention_due(self, iteration: int) -> bool:
        """Iterations 1, 1+every, 1+2·every... measure retention (iteration 1 measures the base model)."""
        return bool(self.retention_task) and self.retention_every > 0 and (iteration - 1) % self.retention_every == 0

    def attestation_due(self, iteration: int) -> bool:
        """Workers attest their state after closed iterations every, 2·every, ... and after the last."""
        return self.attest_every > 0 and (iteration % self.attest_every == 0 or iteration == self.iterations)


# TOML layout: (table, key) -> JobSpec field. Unknown keys are errors, so typos never pass silently.
LAYOUT: dict[tuple[str, str], str] = {
    ("job", "id"): "job_id",
    ("job", "seed"): "job_seed",
    ("job", "model"): "model",
    ("job", "iterations"): "iterations",
    ("task", "name"): "task",
    ("task", "options"): "task_options",
    ("task", "prompts_per_iteration"): "prompts_per_iteration",
    ("task", "prompts_per_member"): "prompts_per_member",
    ("task", "max_new_tokens"): "max_new_tokens",
    ("es", "population"): "population",
    ("es", "sigma"): "sigma",
    ("es", "alpha"): "alpha",
    ("es", "shaping"): "shaping",
    ("es", "antithetic"): "antithetic",
    ("es", "group_size"): "group_size",
    ("es", "anchored_decay"): "anchored_decay",
    ("noise", "family"): "noise_family",
    ("noise", "distribution"): "distribution",
    ("noise", "rank"): "rank",
    ("noise", "lowrank_others"): "lowrank_others",
    ("schedule", "deadline_seconds"): "deadline_seconds",
    ("schedule", "quorum"): "quorum",
    ("schedule", "redundancy"): "redundancy",
    ("schedule", "redundancy_tolerance"): "redundancy_tolerance",
    ("schedule", "revoke_after"): "revoke_after",
    ("schedule", "attest_every"): "attest_every",
    ("schedule", "checkpoint_every"): "checkpoint_every",
    ("schedule", "checkpoint_quorum"): "checkpoint_quorum",
    ("schedule", "spot_check"): "spot_check",
    ("retention", "task"): "retention_task",
    ("retention", "options"): "retention_options",
    ("retention", "every"): "retention_every",
    ("retention", "alert_threshold"): "retention_alert_threshold",
    ("retention", "pause_on_alert"): "pause_on_alert",
}
REQUIRED = (("job", "id"), ("job", "model"), ("task", "name"))


def _where(table: str, key: str) -> str:
    return f"[{table}] {key}"


def _integer(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise JobSpecError(f"{where} must be an integer in [{lo}, {hi}], got {value!r}")
        return value

    return check


def _number(lo: float, hi: float, lo_open: bool = False) -> Callable[[str, Any], float]:
    def check(where: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise JobSpecError(f"{where} must be a finite number, got {value!r}")
        ok = (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise JobSpecError(f"{where} must be in {interval}, got {value!r}")
        return float(value)

    return check


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(where: str, value: Any) -> str:
        if value not in allowed:
            raise JobSpecError(f"{where} must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


def _text(allow_empty: bool) -> Callable[[str, Any], str]:
    def check(where: str, value: Any) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise JobSpecError(f"{where} must be a {'' if allow_empty else 'non-empty '}string, got {value!r}")
        return value

    return check


def _boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise JobSpecError(f"{where} must be true or false, got {value!r}")
    return value


def _options(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise JobSpecError(f"{where} must be a table of task options, got {value!r}")
    return MappingProxyType(dict(value))


def _job_id(where: str, value: Any) -> str:
    try:
        return check_job_id(_text(False)(where, value))
    except ValueError as exc:
        raise JobSpecError(f"{where}: {exc}") from None


CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "job_id": _job_id,
    "job_seed": _integer(0, MAX_JOB_SEED),
    "model": _text(False),
    "iterations": _integer(1, 10_000_000),
    "task": _text(False),
    "task_options": _options,
    "prompts_per_iteration": _integer(1, 1_000_000),
    "prompts_per_member": _integer(1, 1_000_000),
    "max_new_tokens": _integer(1, 1_000_000),
    "population": _integer(1, MAX_POPULATION),
    "sigma": _number(0.0, 1.0, lo_open=True),
    "alpha": _number(0.0, 1.0, lo_open=True),
    "shaping": _choice(SHAPING_METHODS),
    "antithetic": _boolean,
    "group_size": _integer(1, MAX_POPULATION),
    "anchored_decay": _number(0.0, 1.0),
    "noise_family": _choice(NOISE_FAMILIES),
    "distribution": _choice(NOISE_DISTRIBUTIONS),
    "rank": _integer(1, 64),
    "lowrank_others": _choice(LOWRANK_OTHERS),
    "deadline_seconds": _number(0.0, 86_400.0, lo_open=True),
    "quorum": _number(0.0, 1.0, lo_open=True),
    "redundancy": _integer(1, 16),
    "redundancy_tolerance": _number(0.0, math.inf),
    "revoke_after": _integer(1, 1_000_000),
    "attest_every": _integer(0, 10_000_000),
    "checkpoint_every": _integer(0, 10_000_000),
    "checkpoint_quorum": _integer(1, 1_000),
    "spot_check": _number(0.0, 1.0),
    "retention_task": _text(True),
    "retention_options": _options,
    "retention_every": _integer(0, 10_000_000),
    "retention_alert_threshold": _number(0.0, math.inf),
    "pause_on_alert": _boolean,
}


def _flatten(document: dict[str, Any]) -> dict[str, Any]:
    tables = sorted({table for table, _ in LAYOUT})
    values: dict[str, Any] = {}
    for table, content in document.items():
        if table not in tables:
            raise JobSpecError(f"unknown table [{table}]; the tables are {', '.join(f'[{t}]' for t in tables)}")
        if not isinstance(content, dict):
            raise JobSpecError(f"{table} must be a table ([{table}]), got {content!r}")
        for key, value in content.items():
            if (table, key) not in LAYOUT:
                keys = ", ".join(k for t, k in LAYOUT if t == table)
                raise JobSpecError(f"unknown key {_where(table, key)}; [{table}] takes {keys}")
            name = LAYOUT[(table, key)]
            values[name] = CHECKS[name](_where(table, key), value)
    for table, key in REQUIRED:
        if LAYOUT[(table, key)] not in values:
            raise JobSpecError(f"{_where(table, key)} is required")
    return values


def _check_consistency(spec: JobSpec) -> None:
    if spec.antithetic and spec.population % 2:
        raise JobSpecError(f"[es] population must be even with antithetic = true, got {spec.population}")
    if spec.population % spec.group_width:
        raise JobSpecError(
            f"[es] group_size ({spec.group_width}) must divide [es] population ({spec.population}): "
            "every group has the same number of members"
        )
    if spec.antithetic and spec.group_width % 2:
        raise JobSpecError(
            f"[es] group_size must be even with antithetic = true, got {spec.group_width}: "
            "a member and its mirror are evaluated on the same prompts, in one group"
        )
    if math.ceil(spec.quorum * spec.population - 1e-9) < 2:
        raise JobSpecError(
            f"[schedule] quorum × [es] population must allow at least 2 rewarded members for shaping; "
            f"got {spec.quorum} × {spec.population}"
        )
    if spec.checkpoint_every and (spec.attest_every == 0 or spec.checkpoint_every % spec.attest_every):
        raise JobSpecError(
            f"[schedule] checkpoint_every ({spec.checkpoint_every}) must be a multiple of [schedule] attest_every "
            f"({spec.attest_every}, which must be >= 1): a checkpoint needs attestations at its iteration"
        )
    if bool(spec.retention_task) != (spec.retention_every > 0):
        raise JobSpecError("[retention] task and [retention] every go together: set both (every >= 1) or neither")
    if spec.pause_on_alert and spec.retention_alert_threshold <= 0:
        raise JobSpecError("[retention] pause_on_alert needs [retention] alert_threshold > 0")


def parse_job_spec(text: bytes) -> JobSpec:
    """Validate TOML bytes into a JobSpec that keeps those exact bytes (its sha256 goes in genesis)."""
    try:
        document = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise JobSpecError(f"job spec is not UTF-8 text ({exc}); save the TOML file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(f"job spec is not valid TOML: {exc}") from None
    spec = JobSpec(**_flatten(document), spec_bytes=text)
    _check_consistency(spec)
    return spec


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise JobSpecError(f"cannot read job spec {path}: {exc.strerror}; pass an existing TOML file") from None
    try:
        return parse_job_spec(text)
    except JobSpecError as exc:
        raise JobSpecError(f"{path}: {exc}") from None

