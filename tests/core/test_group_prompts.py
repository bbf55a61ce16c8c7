"""Prompt choice under groups: the default draw unchanged, each group its own prompts, and the HF backend
evaluating members with different prompts in one batched generation."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmtune.backends.hf import HFBackend, PromptBatch, encode_member_prompts, encode_prompts
from swarmtune.jobspec import parse_job_spec
from swarmtune.models import load_model
from swarmtune.noise import NoiseConfig
from swarmtune.seeds import population
from swarmtune.state import build_plan, master_from_model
from swarmtune.tasks.base import DatasetTask, Example, sample_indices
from swarmtune.worker.measure import member_prompts, prompt_batch

TASK = DatasetTask("sums", (0.0, 1.0), tuple(Example(f"{a}+{b}=", {"a": a}) for a in range(6) for b in range(5)), (), lambda p, c, **_: [0.0] * len(c))
BASE = b'[job]\nid = "prompts"\nseed = 31\nmodel = "builtin:tiny"\n[task]\nname = "countdown"\nprompts_per_iteration = 5\n'


def old_indices(job_seed: int, iteration: int, size: int, k: int) -> list[int]:
    """The draw before groups existed, spelt out."""
    digest = hashlib.sha256(f"swarmtune/prompts/v1/train/{job_seed}/{iteration}".encode()).digest()
    return sorted(random.Random(int.from_bytes(digest[:8], "little")).sample(range(size), k))


def test_the_default_draw_is_the_one_before_groups() -> None:
    for iteration in range(1, 20):
        assert sample_indices(31, iteration, 30, 5) == old_indices(31, iteration, 30, 5)
        assert sample_indices(31, iteration, 30, 5, group=0) == old_indices(31, iteration, 30, 5)
    spec = parse_job_spec(BASE + b"[es]\npopulation = 6\n")
    members = list(population(spec.job_seed, 3, spec.population, spec.antithetic))
    expected = [TASK.train()[i] for i in old_indices(31, 3, 30, 5)]
    assert prompt_batch(TASK, spec, 3) == expected
    assert member_prompts(TASK, spec, 3, members) == [expected] * 6


def test_groups_draw_their_own_prompts_and_members_get_their_groups() -> None:
    spec = parse_job_spec(BASE + b"prompts_per_member = 3\n[es]\npopulation = 8\nantithetic = true\ngroup_size = 2\n")
    members = list(population(spec.job_seed, 4, spec.population, spec.antithetic))
    per_member = member_prompts(TASK, spec, 4, members)
    assert all(len(prompts) == 3 for prompts in per_member)
    assert per_member[0] == [TASK.train()[i] for i in old_indices(31, 4, 30, 3)]  # group 0 draws as before
    for g in range(4):
        assert per_member[2 * g] == per_member[2 * g + 1] == prompt_batch(TASK, spec, 4, g)  # a pair shares its group's
    assert len({tuple(e.prompt for e in prompts) for prompts in per_member[::2]}) == 4
    assert member_prompts(TASK, spec, 4, members[5:1:-1]) == per_member[5:1:-1]  # whatever members a call holds


@pytest.fixture()
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model(tiny_model_dir)


def backend(model: Any, tokenizer: Any, max_rows: int | None = None) -> HFBackend:
    state = master_from_model(model, build_plan(model, "lowrank"))
    return HFBackend(model, tokenizer, state, NoiseConfig(family="lowrank", distribution="gaussian", rank=1), 0.01, "cpu", max_rows=max_rows)


def text_reward(prompts: list[str], completions: list[str], **_: list[Any]) -> list[float]:
    """Depends on prompt and completion alike, so a member's reward shows which prompts it saw."""
    return [float(sum(map(ord, p + c)) % 97) for p, c in zip(prompts, completions)]


def test_shared_prompts_encode_as_the_repeated_batch(loaded: tuple[Any, Any]) -> None:
    prompts = ["12+34=", "a", "Using 3, 5 and 7, make 22."]
    repeated = encode_prompts(loaded[1], prompts, "cpu").repeat(3)
    member_major = encode_member_prompts(loaded[1], [prompts] * 3, "cpu")
    assert torch.equal(member_major.input_ids, repeated.input_ids) and torch.equal(member_major.attention_mask, repeated.attention_mask)


def test_members_with_different_prompts_are_one_batched_generation(loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = loaded
    train = TASK.train()
    members = list(population(7, 2, 6, antithetic=True))
    per_member = [[train[0], train[7]], [train[0], train[7]], [train[11], train[3]], [train[11], train[3]], [train[20], train[29]], [train[20], train[29]]]
    ev, chunked = backend(model, tokenizer), backend(model, tokenizer, max_rows=4)  # both from the base weights
    generations: list[int] = []
    completions = ev._completions

    def counted(batch: PromptBatch, max_new_tokens: int) -> list[str]:
        generations.append(batch.rows)
        return completions(batch, max_new_tokens)

    monkeypatch.setattr(ev, "_completions", counted)
    batched = ev.evaluate_each(members, per_member, text_reward, 6)
    assert generations == [12]  # six members × two prompts, one generation
    assert chunked.evaluate_each(members, per_member, text_reward, 6) == batched  # chunks of whole members
    # Materialised members write their weights into the shared model: last, from the backend that shows its center again.
    alone = [ev.evaluate_each([m], [prompts], text_reward, 6, materialised=True)[0] for m, prompts in zip(members, per_member)]
    assert batched == alone
    assert ev.evaluate(members, per_member[0], text_reward, 6) == ev.evaluate_each(members, [per_member[0]] * 6, text_reward, 6)


def test_members_need_as_many_prompts_each(loaded: tuple[Any, Any]) -> None:
    ev = backend(*loaded)
    members = list(population(7, 2, 2, antithetic=True))
    train = TASK.train()
    with pytest.raises(ValueError, match=r"members have \[1, 2\] examples each; every member needs the same number"):
        ev.evaluate_each(members, [[train[0]], [train[1], train[2]]], text_reward, 4)
    with pytest.raises(ValueError, match="1 example lists for 2 members"):
        ev.evaluate_each(members, [[train[0]]], text_reward, 4)
    with pytest.raises(ValueError, match="at least one example"):
        ev.evaluate(members, [], text_reward, 4)
    assert ev.evaluate_each([], [], text_reward, 4) == []
