"""Group shaping (EGGROLL's group fitness): each group normalised alone, n of the whole iteration, the
default one group exactly the old rule, and the job spec's group keys validated."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from swarmtune import batches, coefficients, identity, shaping
from swarmtune.batches import Recorded
from swarmtune.entries import Iteration, NoisePlan
from swarmtune.jobspec import JobSpecError, parse_job_spec

REWARDS = (0.5, 0.25, 1.0, 0.0, 0.75, 0.5, 0.125, 0.875)
ALPHA = 0.01
HEAD = bytes(32)

SPEC = b"""
[job]
id = "groups-unit"
seed = 9
model = "builtin:tiny"
[task]
name = "countdown"
prompts_per_member = 2
[es]
population = 8
alpha = 0.01
antithetic = true
group_size = 4
"""


def old_coefficients(rewards: list[float], method: str, alpha: float) -> list[int]:
    """The rule before groups existed, spelt out: shape every reward together, quantise with n of them."""
    return shaping.quantize(shaping.shape(rewards, method), alpha)


@pytest.mark.parametrize("method", shaping.SHAPING_METHODS)
def test_default_is_the_one_group_rule_it_always_was(method: str) -> None:
    rewards = list(REWARDS)
    expected = old_coefficients(rewards, method, ALPHA)
    assert shaping.coefficients(rewards, method, ALPHA) == expected
    assert shaping.coefficients(rewards, method, ALPHA, [0] * len(rewards)) == expected
    assert shaping.coefficients(rewards, method, ALPHA, [3] * len(rewards)) == expected  # a label is only a label


@pytest.mark.parametrize("method", shaping.SHAPING_METHODS)
def test_each_group_is_normalised_alone_and_quantised_with_the_iterations_n(method: str) -> None:
    rewards = list(REWARDS)
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    got = shaping.coefficients(rewards, method, ALPHA, groups)
    scores = shaping.shape(rewards[:4], method) + shaping.shape(rewards[4:], method)
    n = len(rewards)
    assert got == [round(((ALPHA * s) / n) * 2.0**40) for s in scores]
    assert got != shaping.coefficients(rewards, method, ALPHA)
    # A shift of one group's rewards changes nothing: only ranks and spread within a group count.
    shifted = [r + (10.0 if g else 0.0) for r, g in zip(rewards, groups)]
    assert shaping.coefficients(shifted, "centered_rank", ALPHA, groups) == shaping.coefficients(rewards, "centered_rank", ALPHA, groups)


def test_interleaved_labels_keep_member_order_and_a_lone_member_shapes_to_zero() -> None:
    rewards = [0.1, 0.9, 0.3, 0.7, 0.5]
    groups = [0, 1, 0, 1, 2]
    got = shaping.coefficients(rewards, "zscore", ALPHA, groups)
    first, second = shaping.zscore([0.1, 0.3]), shaping.zscore([0.9, 0.7])
    assert got == shaping.quantize([first[0], second[0], first[1], second[1], 0.0], ALPHA)
    assert got[4] == 0
    with pytest.raises(ValueError, match="one label per reward"):
        shaping.coefficients(rewards, "zscore", ALPHA, groups[:4])


def test_spec_defaults_are_one_group_on_the_iterations_prompts() -> None:
    text = b'[job]\nid = "d"\nmodel = "builtin:tiny"\n[task]\nname = "countdown"\nprompts_per_iteration = 7\n[es]\npopulation = 6\n'
    spec = parse_job_spec(text)
    assert (spec.group_size, spec.prompts_per_member) == (None, None)
    assert (spec.group_width, spec.member_prompt_count) == (6, 7)
    assert {spec.group_of(m) for m in range(6)} == {0}
    # Genesis records the spec's bytes and their hash: keys a spec leaves out add nothing to either.
    assert spec.spec_bytes == text and spec.spec_sha256 == hashlib.sha256(text).digest()


def test_group_keys_parse_and_antithetic_pairs_share_a_group() -> None:
    spec = parse_job_spec(SPEC)
    assert (spec.group_width, spec.member_prompt_count) == (4, 2)
    assert [spec.group_of(m) for m in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(spec.group_of(2 * j) == spec.group_of(2 * j + 1) for j in range(4))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"group_size = 4", b"group_size = 3", "group_size (3) must divide [es] population (8)"),
        (b"population = 8", b"population = 10", "group_size (4) must divide [es] population (10)"),
        (b"population = 8", b"population = 6", "group_size (4) must divide"),
        (b"group_size = 4", b"group_size = 0", "[es] group_size must be an integer in [1, 100000]"),
        (b"prompts_per_member = 2", b"prompts_per_member = 0", "[task] prompts_per_member must be an integer in [1,"),
        (b"prompts_per_member = 2", b"prompts_per_member = 1.5", "[task] prompts_per_member must be an integer"),
    ],
)
def test_invalid_group_keys_are_refused_with_what_to_do(old: bytes, new: bytes, message: str) -> None:
    with pytest.raises(JobSpecError) as caught:
        parse_job_spec(SPEC.replace(old, new))
    assert message in str(caught.value)


def test_odd_groups_are_refused_with_antithetic_pairs() -> None:
    odd = SPEC.replace(b"population = 8", b"population = 6").replace(b"group_size = 4", b"group_size = 3")
    with pytest.raises(JobSpecError, match="group_size must be even with antithetic = true, got 3: a member and its mirror"):
        parse_job_spec(odd)
    assert parse_job_spec(odd.replace(b"antithetic = true", b"antithetic = false")).group_width == 3


def grouped_iteration(rewarded: tuple[int, ...]) -> Iteration:
    """Iteration 2 as a coordinator closes it under group shaping: `rewarded` members have results."""
    job = parse_job_spec(SPEC)
    recorded = (Recorded(batches.sign_batch(identity.generate_key(), job.job_id, 2, HEAD, rewarded, [REWARDS[m] for m in rewarded])),)
    groups = [job.group_of(m) for m in rewarded]
    shaped = dict(zip(rewarded, shaping.coefficients([REWARDS[m] for m in rewarded], job.shaping, job.alpha, groups)))
    applied = tuple(shaped.get(m, 0) for m in range(job.population))
    return Iteration(2, HEAD, NoisePlan(job.job_seed, job.population, job.antithetic), recorded, applied, (), job.shaping)


def test_the_walk_rederives_groups() -> None:
    spec = parse_job_spec(SPEC)
    rule = shaping.Rule(spec.shaping, spec.alpha, spec.group_width)
    body = grouped_iteration(tuple(range(8)))
    assert coefficients.derived(body, rule) == body.coefficients
    # The same rewards shaped as one group are not what this job applies.
    assert coefficients.derived(body, replace(rule, group_width=spec.population)) != body.coefficients


def test_a_group_left_with_one_rewarded_member_gives_it_zero() -> None:
    spec = parse_job_spec(SPEC)
    body = grouped_iteration((0, 1, 2, 3, 5))  # group 1 has member 5 alone
    assert coefficients.derived(body, shaping.Rule(spec.shaping, spec.alpha, spec.group_width)) == body.coefficients
    assert body.coefficients[5] == 0 and any(body.coefficients[:4])
    # Quantised with n = 5, every rewarded member, not the group's 4.
    assert body.coefficients[:4] == tuple(shaping.quantize([*shaping.zscore(list(REWARDS[:4])), 0.0], spec.alpha)[:4])


def test_the_protocols_group_vector() -> None:
    section = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text().split("## 7. Test vectors", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert block, "PROTOCOL.md §7 must hold a ```json block of test vectors"
    v = json.loads(block.group(1))["group_coefficients"]
    groups = [m // v["group_size"] for m in v["members"]]
    for method in shaping.SHAPING_METHODS:
        assert shaping.coefficients(v["rewards"], method, v["alpha"], groups) == v[method]
