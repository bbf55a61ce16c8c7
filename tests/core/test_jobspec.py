"""Job spec: defaults from the paper, exact bytes kept, and errors that name the field."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from swarmtune import jobspec, noise
from swarmtune.jobspec import JobSpec, JobSpecError, load_job_spec, parse_job_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MINIMAL = b"""
[job]
id = "t1"
model = "builtin:tiny"

[task]
name = "countdown"
"""


def with_lines(*lines: str) -> bytes:
    """MINIMAL plus extra TOML (tables may repeat only once, so callers add whole tables)."""
    return MINIMAL + "\n".join(lines).encode()


def test_defaults_follow_the_paper() -> None:
    spec = parse_job_spec(MINIMAL)
    assert (spec.population, spec.sigma, spec.alpha, spec.shaping) == (30, 1e-3, 5e-4, "zscore")
    assert spec.noise.family == "dense" and spec.redundancy == 1 and spec.quorum == 1.0
    assert spec.task_options == {} and not spec.antithetic


def test_exact_bytes_and_hash_are_kept() -> None:
    text = MINIMAL + b"# a comment is part of the spec bytes\n"
    spec = parse_job_spec(text)
    assert spec.spec_bytes == text
    assert spec.spec_sha256 == hashlib.sha256(text).digest()


def test_every_table_maps_to_fields() -> None:
    spec = parse_job_spec(
        with_lines(
            'prompts_per_iteration = 8',  # still inside [task]
            "max_new_tokens = 16",
            "[task.options]",
            "count = 50",
            "[es]",
            "population = 10",
            "sigma = 0.01",
            "alpha = 0.005",
            'shaping = "centered_rank"',
            "antithetic = true",
            "anchored_decay = 0.001",
            "[noise]",
            'family = "lowrank"',
            'distribution = "rademacher"',
            "rank = 2",
            'lowrank_others = "dense"',
            "[schedule]",
            "deadline_seconds = 5",
            "quorum = 0.8",
            "redundancy = 2",
            "redundancy_tolerance = 0.01",
            "revoke_after = 2",
            "attest_every = 3",
            "checkpoint_every = 6",
            "checkpoint_quorum = 3",
            "spot_check = 0.05",
            "[retention]",
            'task = "math"',
            "every = 4",
            "alert_threshold = 0.1",
            "pause_on_alert = true",
            "[retention.options]",
            'data = "x.jsonl"',
        )
    )
    assert spec.prompts_per_iteration == 8 and spec.max_new_tokens == 16 and spec.task_options == {"count": 50}
    assert (spec.population, spec.sigma, spec.alpha, spec.shaping, spec.antithetic) == (10, 0.01, 0.005, "centered_rank", True)
    assert spec.noise.family == "lowrank" and spec.noise.rank == 2 and spec.lowrank_others == "dense"
    assert (spec.deadline_seconds, spec.quorum, spec.redundancy, spec.revoke_after, spec.attest_every) == (5.0, 0.8, 2, 2, 3)
    assert (spec.checkpoint_every, spec.checkpoint_quorum, spec.spot_check) == (6, 3, 0.05)
    assert spec.retention_task == "math" and spec.retention_options == {"data": "x.jsonl"} and spec.pause_on_alert
    assert [t for t in range(1, 10) if spec.retention_due(t)] == [1, 5, 9]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["[es]", "population = 0"], "[es] population must be an integer in [1, 100000], got 0"),
        (["[es]", "sigma = -1.0"], "[es] sigma must be in (0.0, 1.0], got -1.0"),
        (["[es]", "sigma = nan"], "[es] sigma must be a finite number"),
        (["[es]", 'shaping = "rank"'], "[es] shaping must be one of zscore, centered_rank; got 'rank'"),
        (["[es]", 'antithetic = "yes"'], "[es] antithetic must be true or false"),
        (["[es]", "population = 7", "antithetic = true"], "[es] population must be even with antithetic = true, got 7"),
        (["[noise]", 'family = "sparse"'], "[noise] family must be one of dense, lowrank; got 'sparse'"),
        (["[noise]", "rank = 65"], "[noise] rank must be an integer in [1, 64], got 65"),
        (["[schedule]", "quorum = 0"], "[schedule] quorum must be in (0.0, 1.0], got 0"),
        (["[schedule]", "redundancy = 1.5"], "[schedule] redundancy must be an integer"),
        (["[schedule]", "deadline = 5"], "unknown key [schedule] deadline; [schedule] takes deadline_seconds"),
        (["[es]", "population = 4", "[schedule]", "quorum = 0.25"], "must allow at least 2 rewarded members"),
        (["[retention]", 'task = "math"'], "[retention] task and [retention] every go together"),
        (["[retention]", "pause_on_alert = true"], "pause_on_alert needs [retention] alert_threshold > 0"),
        (["[optimizer]", "lr = 1"], "unknown table [optimizer]"),
        (["[schedule]", "attest_every = 2", "checkpoint_every = 5"], "checkpoint_every (5) must be a multiple of [schedule] attest_every (2"),
        (["[schedule]", "attest_every = 0", "checkpoint_every = 5"], "checkpoint_every (5) must be a multiple"),
        (["[schedule]", "spot_check = 1.5"], "[schedule] spot_check must be in [0.0, 1.0], got 1.5"),
    ],
)
def test_invalid_values_name_the_field(extra: list[str], message: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job_spec(with_lines(*extra))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (b'[job]\nmodel = "x"\n[task]\nname = "countdown"\n', "[job] id is required"),
        (b'[job]\nid = "bad id!"\nmodel = "x"\n[task]\nname = "c"\n', "[job] id: job id 'bad id!' must be"),
        (b'[job]\nid = "a"\nmodel = "x"\n[task]\nname = "c"\n[job.extra]\n', "unknown key [job] extra"),
        (b"[job\n", "job spec is not valid TOML"),
        (b"\xff\xfe", "job spec is not UTF-8 text"),
        (b'[job]\nid = "a"\nmodel = "x"\nseed = -1\n[task]\nname = "c"\n', "[job] seed must be an integer in [0, 18446744073709551615]"),
    ],
)
def test_structural_errors(text: bytes, message: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job_spec(text)
    assert message in str(info.value)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(with_lines("[es]", "population = -3"))
    with pytest.raises(JobSpecError, match=r"job\.toml: \[es\] population"):
        load_job_spec(path)
    with pytest.raises(JobSpecError, match="cannot read job spec"):
        load_job_spec(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", ["smoke.toml", "countdown-qwen.toml", "lowrank.toml"])
def test_examples_are_valid(name: str) -> None:
    spec = load_job_spec(EXAMPLES / name)
    assert isinstance(spec, JobSpec) and spec.spec_bytes == (EXAMPLES / name).read_bytes()


def test_smoke_example_is_a_short_tiny_job() -> None:
    spec = load_job_spec(EXAMPLES / "smoke.toml")
    assert spec.model == "builtin:tiny" and spec.iterations == 5


def test_noise_choices_match_the_noise_module() -> None:
    assert jobspec.NOISE_FAMILIES == noise.FAMILIES and jobspec.NOISE_DISTRIBUTIONS == noise.DISTRIBUTIONS
