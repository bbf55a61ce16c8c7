"""The audit's own checks, on hand-built iterations: coefficients derived, the noise plan checked, versions; one parse per entry."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from torch import nn

from swarmtune import batches, coefficients, entries, identity, ledgerfile, shaping
from swarmtune.batches import Recorded
from swarmtune.client.audit import AuditReport, audit, genesis_problem, plan_problem, shaping_problem
from swarmtune.entries import Attestation, Iteration, NoisePlan
from swarmtune.modelbuild import build_tokenizer
from swarmtune.jobspec import JobSpec, parse_job_spec
from swarmtune.ledger import Problem
from swarmtune.noise import NOISE_VERSION
from tests.support.cli_runner import run_cli
from tests.support.replay_ledger import build_ledger, direct_hashes
from tests.support.tiny_models import tiny_llama

SPEC = b"""
[job]
id = "audit-unit"
seed = 9
model = "builtin:tiny"
iterations = 3
[task]
name = "countdown"
[es]
population = 6
alpha = 0.01
antithetic = true
"""
REWARDS = (0.5, 0.25, 1.0, 0.0, 0.75, 0.5)
HEAD = bytes(32)


def spec() -> JobSpec:
    return parse_job_spec(SPEC)


def iteration(rewarded: tuple[int, ...] = tuple(range(6)), replicas: int = 1) -> Iteration:
    """Iteration 2 as a coordinator closes it: only `rewarded` members have results (each `replicas` times)."""
    job = spec()
    keys = [identity.generate_key() for _ in range(replicas)]
    recorded = tuple(Recorded(batches.sign_batch(key, job.job_id, 2, HEAD, rewarded, [REWARDS[m] for m in rewarded])) for key in keys)
    shaped = dict(zip(rewarded, shaping.coefficients([REWARDS[m] for m in rewarded], job.shaping, job.alpha)))
    applied = tuple(shaped.get(m, 0) for m in range(job.population))
    return Iteration(2, HEAD, NoisePlan(job.job_seed, job.population, job.antithetic), recorded, applied, (), job.shaping)


def derived(body: Iteration) -> tuple[int, ...]:
    job = spec()
    return coefficients.derived(body, shaping.Rule(job.shaping, job.alpha, job.group_width))


def test_coefficients_of_a_full_population_are_what_shaping_gives() -> None:
    body = iteration()
    assert derived(body) == tuple(shaping.coefficients(list(REWARDS), "zscore", 0.01)) == body.coefficients


def test_members_without_a_result_are_left_out_of_shaping() -> None:
    body = iteration(rewarded=(0, 2, 3, 5))
    assert derived(body) == body.coefficients
    assert body.coefficients[1] == body.coefficients[4] == 0
    assert derived(body) != derived(iteration())  # n and the mean changed


def test_redundant_replicas_count_a_member_once() -> None:
    assert derived(iteration(replicas=2)) == derived(iteration())


def test_a_changed_reward_changes_every_coefficient_it_feeds() -> None:
    body = iteration()
    (recorded,) = body.batches
    changed = batches.sign_batch(identity.generate_key(), "audit-unit", 2, HEAD, range(6), (0.6, *REWARDS[1:]))
    moved = [a != b for a, b in zip(derived(replace(body, batches=(replace(recorded, batch=changed),))), body.coefficients)]
    assert all(moved)  # the mean and the spread changed: every member's score


def test_shaping_must_be_the_job_specs() -> None:
    assert shaping_problem(iteration(), spec()) is None
    problem = shaping_problem(replace(iteration(), shaping="centered_rank"), spec())
    assert problem is not None and "the job spec says 'zscore'" in problem


def test_the_noise_plan_must_be_the_job_specs() -> None:
    body = iteration()
    assert plan_problem(body, spec()) is None
    assert body.members[1].seed == body.members[0].seed and body.members[1].sign == -1  # antithetic pairs
    for changed in (replace(body.plan, job_seed=10), replace(body.plan, population=4), replace(body.plan, antithetic=False)):
        assert "the job spec gives" in (plan_problem(replace(body, plan=changed), spec()) or "")


def test_a_genesis_from_another_noise_version_cannot_be_audited() -> None:
    key = identity.public_key_bytes(identity.generate_key())
    genesis = entries.new_genesis(SPEC, HEAD, key, protocol_version=entries.PROTOCOL_VERSION, noise_version=NOISE_VERSION, shaping_version=shaping.SHAPING_VERSION)
    assert genesis_problem(genesis) == (spec(), None)
    job, problem = genesis_problem(replace(genesis, noise_version="swarmtune-noise/9"))
    assert job is None and problem is not None and "audit with a matching swarmtune" in problem


def test_the_report_says_where_and_why_in_json_and_text() -> None:
    report = AuditReport("job", 9, 4, 2, 11, False, 0, None, HEAD, Problem(4, "iteration", "member 3's coefficient is 1"))
    assert not report.ok
    assert report.to_json() | {"head_hash": None} == {
        "ok": False, "job_id": "job", "entries": 9, "sound_entries": 4, "iterations": 2, "worker_signatures": 11,
        "replayed": False, "attestations_checked": 0, "final_state_hash": None, "head_hash": None,
        "first_bad_index": 4, "kind": "iteration", "reason": "member 3's coefficient is 1",
    }  # fmt: skip
    text = report.describe()
    assert text.startswith("audit FAILED: entry 4 (iteration): member 3's coefficient is 1") and "--replay" in text


def attested_ledger(model: nn.Module) -> list[bytes]:
    """A sound ledger of `model` whose last entry attests the state after its last iteration."""
    coordinator, worker = identity.generate_key(), identity.generate_key()
    stored = build_ledger(model, coordinator=coordinator, worker=worker)
    state_hash = direct_hashes(model, stored)[-1]
    attestation = entries.sign_record(worker, Attestation("replay-test", 3, state_hash, identity.public_key_bytes(worker)))
    return [*stored, entries.seal(coordinator, entries.next_entry(entries.parse_entry(stored[-1]), attestation, 4))]


def counted_parses(monkeypatch: pytest.MonkeyPatch) -> Counter[bytes]:
    """How often each stored entry is parsed from now on."""
    parsed: Counter[bytes] = Counter()
    parse = entries.parse_entry

    def counting(stored: bytes) -> entries.StoredEntry:
        parsed[stored] += 1
        return parse(stored)

    monkeypatch.setattr(entries, "parse_entry", counting)
    return parsed


@pytest.mark.parametrize("replayed", [False, True], ids=["checks", "checks and replay"])
def test_the_audit_parses_each_entry_once(monkeypatch: pytest.MonkeyPatch, replayed: bool) -> None:
    model = tiny_llama(hidden=16)
    stored = attested_ledger(model)
    parsed = counted_parses(monkeypatch)
    report = audit(stored, model if replayed else None)
    assert report.ok and report.sound == len(stored) == 5, report.describe()
    assert (report.replayed, report.attestations_checked) == (replayed, int(replayed))
    assert parsed == Counter(stored)


def test_the_audit_command_parses_each_entry_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = tiny_llama(hidden=16, tie=False)
    model.save_pretrained(tmp_path / "model")
    build_tokenizer(tmp_path / "model")  # a model directory as workers load it
    ledgerfile.write(tmp_path / "ledger.bin", attested_ledger(model))
    stored = ledgerfile.read(tmp_path / "ledger.bin")
    parsed = counted_parses(monkeypatch)
    assert run_cli(monkeypatch, "audit", "--ledger", str(tmp_path / "ledger.bin"), "--replay", "--model", str(tmp_path / "model")) == 0
    assert "audit OK" in capsys.readouterr().out
    assert parsed == Counter(stored)
