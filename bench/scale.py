"""The 0.5B scale bench (issue 15): memory, update share, update and evaluation speed, replay and late join.

    python bench/scale.py            # Qwen2.5-0.5B's shape; progress on stderr, ONE JSON line on stdout
    python bench/scale.py --small    # the same structure at ~120M parameters (6 layers, 32k vocab)

A real coordinator (embedded Redis) and one worker run a few iterations low-rank, then dense; every
figure is measured next to its reference in this run: peak RSS (VmHWM) of each process per parameter,
the worker's exact update against its evaluation of the same iteration (its own log lines), replay of
the exported ledger in its own process, and in this process the exact dense update against Qiu et
al.'s float update and low-rank batched evaluation against plain batched greedy decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from swarmtune.backends.hf import HFBackend, encode_prompts, greedy_tokens
from swarmtune.demo.cluster import ensure_key, free_port
from swarmtune.embedded_redis import EmbeddedRedis
from swarmtune.modelbuild import QWEN05B_SHAPE, build_qwen2_model
from swarmtune.modelpaths import cache_root
from swarmtune.models import load_model
from swarmtune.noise import NoiseConfig
from swarmtune.noisecache import NoiseCache
from swarmtune.seeds import MemberNoise, population
from swarmtune.shaping import COEFFICIENT_BITS, coefficients
from swarmtune.state import MasterState, build_plan, canonical_parameters, master_from_model
from swarmtune.tasks.registry import load_task
from swarmtune.update import IterationUpdate, apply_iteration_

TASK = f"{Path(__file__).with_name('scale_task.py')}:TASK"
SMALL_SHAPE = {**QWEN05B_SHAPE, "layers": 6, "vocab": 32768}
# Antithetic populations. Dense ES regenerates every parameter's noise per member (32-139 s a member
# at 120M parameters on this shared 2-core machine), so its job runs one pair: the update share does
# not depend on the size (evaluation is per member, the update per seed).
POPULATION = {"lowrank": 8, "dense": 2}
PROMPTS = 8
NEW_TOKENS = 8
SIGMA = 1e-3
ALPHA = 1e-3
JOB_SEED = 15
ITERATIONS = {"lowrank": 3, "dense": 1}  # low-rank: 1 before the checkpoint, 2 by a late joiner
PROCESS_TIMEOUT_S = 1800.0  # one wait (a 0.5B worker's start, load, evaluation and update on a busy machine)
STOP_GRACE_S = 180.0
ROUNDS = 5  # in-process evaluation comparison, interleaved; the best round is the least disturbed one
GOALS = {
    "worker_bytes_per_param_lowrank": ("<=", 7.0),
    "worker_bytes_per_param_dense": ("<=", 7.0),
    "coordinator_peak_gb": ("<=", 0.5),
    "replay_bytes_per_param": ("<=", 7.0),
    "update_share_lowrank": ("<=", 0.10),
    "dense_update_vs_reference": ("<=", 1.5),
    "lowrank_vs_decoding": (">=", 0.8),
}


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} scale: {message}", file=sys.stderr, flush=True)


def cached_model(shape: dict[str, int]) -> Path:
    """The model of `shape` under the swarmtune cache, built once (into a temporary directory first,
    so an interrupted build is never mistaken for a model)."""
    name = "qwen2-shape-" + "-".join(f"{key}{value}" for key, value in sorted(shape.items()))
    target = cache_root() / "bench" / name
    if (target / "model.safetensors").exists():
        return target
    say(f"building {name} in {target.parent} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=name, dir=target.parent))
    build_qwen2_model(building, **shape)
    building.rename(target)
    return target


class Watched:
    """A child process whose peak RSS is read from /proc/<pid>/status (VmHWM) while it runs (every
    0.2 s, and when asked). Not wait4's ru_maxrss: Linux carries the forked parent's RSS across exec
    into it, so every child would report at least this process's size."""

    def __init__(self, name: str, args: Sequence[str], workdir: Path) -> None:
        self.name, self.log = name, workdir / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "swarmtune", *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.started = time.perf_counter()
        self.peak_bytes = 0
        self.code: int | None = None
        self.seconds = 0.0
        self.reaping = threading.Lock()  # the sampling thread polls too: reap exactly once

    def poll(self) -> int | None:
        with self.reaping:
            return self._poll()

    def _poll(self) -> int | None:
        if self.code is not None:
            return self.code
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            self.peak_bytes = max(self.peak_bytes, kib * 1024)
        except (OSError, StopIteration):
            pass  # exited: its last reading stands
        pid, status_code, _ = os.wait4(self.process.pid, os.WNOHANG)
        if pid:
            self.code = self.process.returncode = os.waitstatus_to_exitcode(status_code)
            self.seconds = time.perf_counter() - self.started
        return self.code

    def wait(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"{self.name} did not finish within {timeout_s:.0f} s; its log {self.log} ends:\n{self.tail()}")
            time.sleep(0.1)
        assert self.code is not None
        return self.code

    def checked(self, timeout_s: float = PROCESS_TIMEOUT_S) -> Watched:
        if self.wait(timeout_s) != 0:
            raise RuntimeError(f"{self.name} exited with code {self.code}; its log {self.log} ends:\n{self.tail()}")
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON objects it logged or printed, one a line (of one event name if given)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut while being written
        return [event for event in found if name is None or event.get("event") == name]

    def wait_for_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Its first event `name`, waiting for it while it runs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.poll() is None:
            if found := self.events(name):
                return found[0]
            time.sleep(0.2)
        if found := self.events(name):
            return found[0]
        raise RuntimeError(f"{self.name}: no {name!r} event within {timeout_s:.0f} s (exit {self.code}); its log {self.log} ends:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then up to grace_s to drain (a worker finishes the members it is evaluating)."""
        if self.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.wait(grace_s)
            except RuntimeError:
                pass  # killed


def job_toml(family: str, model_dir: Path) -> str:
    iterations = ITERATIONS[family]
    # Low-rank: a checkpoint after iteration 1 (one attesting worker is its quorum) for the late joiner.
    schedule = "attest_every = 1\ncheckpoint_every = 1\ncheckpoint_quorum = 1" if family == "lowrank" else f"attest_every = {iterations}"
    return f"""[job]
id = "scale-{family}"
seed = {JOB_SEED}
model = {json.dumps(str(model_dir))}
iterations = {iterations}

[task]
name = {json.dumps(TASK)}
prompts_per_iteration = {PROMPTS}
max_new_tokens = {NEW_TOKENS}

[es]
population = {POPULATION[family]}
sigma = {SIGMA}
alpha = {ALPHA}
antithetic = true

[noise]
family = "{family}"

[schedule]
deadline_seconds = 600
{schedule}
"""


@dataclasses.dataclass(frozen=True)
class JobRun:
    """One job's processes after the end (the late joiner's, if one joined), its ledger file."""

    workers: tuple[Watched, ...]
    coordinator: Watched
    ledger: Path
    iterations: int
    late_join_s: float | None = None


def run_job(family: str, model_dir: Path, redis_url: str, workdir: Path) -> JobRun:
    """A coordinator and a worker (real processes, the CLI) through the job; the low-rank job's worker
    leaves after the checkpoint of iteration 1 and a second one joins from its snapshot."""
    root = workdir / family
    root.mkdir()
    (root / "job.toml").write_text(job_toml(family, model_dir))
    keys = [root / "worker.key", root / "late-worker.key"]
    admitted = [ensure_key(key).hex() for key in keys]
    address = f"127.0.0.1:{free_port()}"
    coordinator = Watched(
        f"{family}-coordinator",
        ["coordinator", "--job", str(root / "job.toml"), "--redis-url", redis_url, "--key", str(root / "coordinator.key"),
         "--listen", address, "--admit", *admitted, "--min-workers", "1", "--log-json"],
        root,
    )  # fmt: skip
    worker_args = ["worker", "--coordinator", address, "--model", str(model_dir), "--capacity", str(POPULATION[family]), "--log-json"]
    workers = [Watched(f"{family}-worker", [*worker_args, "--key", str(keys[0])], root)]
    late_join_s = None
    with sampling([coordinator, *workers]) as sampled:
        try:
            if family == "lowrank":
                coordinator.wait_for_event("checkpoint", PROCESS_TIMEOUT_S)
                workers[0].stop()  # the job now waits for the late joiner
                if workers[0].code != 0:
                    raise RuntimeError(f"{workers[0].name} exited with code {workers[0].code}:\n{workers[0].tail()}")
                snapshot = snapshot_at(redis_url, family, model_dir, root)
                joined = time.time()
                workers.append(Watched(f"{family}-late-worker", [*worker_args, "--key", str(keys[1]), "--snapshot", str(snapshot)], root))
                sampled.add(workers[-1])
                first = workers[-1].wait_for_event("evaluated", PROCESS_TIMEOUT_S)
                late_join_s = first["ts"] - first["seconds"] - joined  # start to first evaluation
            for worker in workers:
                worker.checked()
            coordinator.checked()
        finally:
            for process in (*workers, coordinator):
                process.stop()
    ledger = root / "ledger.bin"
    export(redis_url, family, ledger, root)
    return JobRun(tuple(workers), coordinator, ledger, ITERATIONS[family], late_join_s)


def export(redis_url: str, family: str, out: Path, workdir: Path) -> None:
    swarmtune(f"{family}-export-{out.stem}", ["ledger", "export", "--redis-url", redis_url, "--job", f"scale-{family}", "--out", str(out), "--force"], workdir)


def snapshot_at(redis_url: str, family: str, model_dir: Path, root: Path) -> Path:
    """`swarmtune snapshot` of iteration 1, from the ledger as it stands."""
    ledger, snapshot = root / "ledger-at-checkpoint.bin", root / "snapshot.bin"
    export(redis_url, family, ledger, root)
    swarmtune("snapshot", ["snapshot", "--ledger", str(ledger), "--model", str(model_dir), "--iteration", "1", "--out", str(snapshot)], root)
    return snapshot


class sampling:
    """Poll the processes' VmHWM every 0.2 s in a thread while the block runs."""

    def __init__(self, processes: Sequence[Watched]) -> None:
        self.processes, self.done = processes, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.2):
            for process in self.processes:
                process.poll()

    def add(self, process: Watched) -> None:
        self.processes = [*self.processes, process]

    def __enter__(self) -> sampling:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        self.thread.join()


def swarmtune(name: str, args: Sequence[str], workdir: Path) -> Watched:
    process = Watched(name, args, workdir)
    with sampling([process]):
        return process.checked()


def update_shares(workers: Sequence[Watched]) -> list[float]:
    """Per iteration and worker: the exact update (the `applied` entry) over the evaluation of its members."""
    return [share for worker in workers for share in worker_shares(worker)]


def worker_shares(worker: Watched) -> list[float]:
    evaluated: dict[int, float] = {}
    applied: dict[int, float] = {}
    for event in worker.events():
        if event.get("event") == "evaluated":
            evaluated[event["iteration"]] = evaluated.get(event["iteration"], 0.0) + event["seconds"]
        elif event.get("event") == "applied":
            applied[event["iteration"]] = event["seconds"]
    return [applied[t] / evaluated[t] for t in sorted(applied) if evaluated.get(t)]


def attested_hash(workers: Sequence[Watched]) -> str | None:
    """The state hash of the last iteration any worker attested."""
    attested = sorted((event["iteration"], event["state_hash"]) for worker in workers for event in worker.events("attesting"))
    return attested[-1][1] if attested else None


def replay_figures(run: JobRun, workdir: Path) -> dict[str, Any]:
    """`swarmtune replay` of the whole ledger and of genesis alone, twice each (the faster run is the
    less disturbed one): peak RSS, seconds per iteration."""
    base = [swarmtune("replay-genesis", ["replay", "--ledger", str(run.ledger), "--until", "0", "--json"], workdir) for _ in range(2)]
    full = [swarmtune("replay", ["replay", "--ledger", str(run.ledger), "--json"], workdir) for _ in range(2)]
    fastest = min(process.seconds for process in full)
    return {
        "peak_bytes": max(process.peak_bytes for process in full),
        "s_per_iteration": (fastest - min(process.seconds for process in base)) / run.iterations,
        "seconds": fastest,
        "matches_worker": all(process.events()[-1]["state_hash"] == attested_hash(run.workers) for process in full),
    }


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def best_ratio(reference: list[tuple[float, float]], measured: list[tuple[float, float]], clock: int) -> float:
    return min(r[clock] for r in reference) / min(m[clock] for m in measured)


def spread(reference: list[tuple[float, float]], measured: list[tuple[float, float]]) -> list[float]:
    """The wall-clock ratio of each round (reference / measured), to show how quiet the machine was."""
    return [round(r[0] / m[0], 3) for r, m in zip(reference, measured)]


def qiu_update(model: torch.nn.Module, members: Sequence[MemberNoise], steps: Sequence[float]) -> None:
    """Qiu et al.'s float update: per seed and tensor, seeded torch.randn added in the model's dtype
    (`steps`: each member's α·s_i/n)."""
    weights: dict[int, float] = {}
    for member, step in zip(members, steps):
        weights[member.seed] = weights.get(member.seed, 0.0) + member.sign * step
    with torch.no_grad():
        for seed, weight in weights.items():
            for param in model.parameters():
                generator = torch.Generator().manual_seed(seed % 2**63)
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype), alpha=weight)


def in_process(model_dir: Path) -> dict[str, Any]:
    """Low-rank batched evaluation vs plain batched greedy decoding of the same 64 rows, then the exact
    dense update of the population vs Qiu et al.'s float update, on one model in this process."""
    task = load_task(TASK)
    model, tokenizer = load_model(model_dir)
    model.generation_config.eos_token_id = []  # no EOS: every row decodes all NEW_TOKENS in both methods
    lowrank = master_from_model(model, build_plan(model, "lowrank"))
    backend = HFBackend(model, tokenizer, lowrank, NoiseConfig("lowrank", "rademacher", 1), SIGMA, "cpu", noise_cache=NoiseCache(1 << 30))
    examples = task.train()[:PROMPTS]
    members = population(JOB_SEED, 1, POPULATION["lowrank"], antithetic=True)
    rows = encode_prompts(tokenizer, [e.prompt for e in examples], "cpu").repeat(len(members))

    def evaluate() -> None:
        backend.noise_cache = NoiseCache(1 << 30)  # each round draws its factors, as a new iteration does
        backend.evaluate(members, examples, task.reward, NEW_TOKENS)

    decode = lambda: greedy_tokens(model, rows, NEW_TOKENS, (), tokenizer.pad_token_id)  # noqa: E731
    decode(), evaluate()  # warm-up
    decoding, batched = [], []
    for _ in range(ROUNDS):
        decoding.append(timed(decode))
        batched.append(timed(evaluate))
    say(f"evaluation of {len(rows.input_ids)} rows: decoding {decoding}, low-rank {batched} (wall, cpu s)")
    # Every tensor dense: the frozen ones read back from their spill into memory, the others shared.
    dense = MasterState(tuple(dataclasses.replace(s, treatment="dense") for s in lowrank.specs), tuple(lowrank.whole(i) for i in range(len(lowrank.specs))))
    # The dense job's population. Fixed distinct rewards: twins of a random model often tie, and a
    # zero coefficient would let the exact update skip its work.
    pair = members[: POPULATION["dense"]]
    integer = coefficients([1.0, 0.0], "zscore", ALPHA)
    steps = [c / 2**COEFFICIENT_BITS for c in integer]
    update = IterationUpdate(pair, tuple(integer))
    noise = NoiseConfig("dense", "gaussian", 1)
    exact, reference = [timed(lambda: apply_iteration_(dense, update, noise))], [timed(lambda: qiu_update(model, pair, steps))]
    say(f"dense update of {len(set(m.seed for m in pair))} seed(s): exact {exact}, reference {reference} (wall, cpu s)")
    return {
        "parameters": sum(param.numel() for _, param in canonical_parameters(model)),
        "frozen_parameters": sum(spec.numel for spec in lowrank.specs if spec.treatment == "frozen"),  # spilled, not resident
        "lowrank_vs_decoding": best_ratio(decoding, batched, 0),
        "lowrank_vs_decoding_cpu": best_ratio(decoding, batched, 1),
        "lowrank_vs_decoding_rounds": spread(decoding, batched),
        "decoding_s": round(min(w for w, _ in decoding), 3),
        "lowrank_eval_s": round(min(w for w, _ in batched), 3),
        "dense_update_vs_reference": 1 / best_ratio(reference, exact, 0),
        "dense_update_vs_reference_cpu": 1 / best_ratio(reference, exact, 1),
        "dense_update_s": round(min(w for w, _ in exact), 3),
        "reference_update_s": round(min(w for w, _ in reference), 3),
    }


def verdicts(figures: dict[str, Any]) -> dict[str, bool | None]:
    checks = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
    return {key: None if figures.get(key) is None else checks[op](figures[key], bound) for key, (op, bound) in GOALS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the same structure at ~120M parameters, for development")
    args = parser.parse_args()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    shape = SMALL_SHAPE if args.small else QWEN05B_SHAPE
    model_dir = cached_model(shape)
    workdir = Path(tempfile.mkdtemp(prefix="swarmtune-scale-"))
    try:
        # First, while no other process of the bench runs.
        say("in-process comparisons")
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # its memory is gone before the jobs start
            measured = pool.apply(in_process, (model_dir,))
        with EmbeddedRedis(workdir / "redis") as redis:
            runs = {}
            for family in ("lowrank", "dense"):
                say(f"{family} job: coordinator and worker, {ITERATIONS[family]} iterations")
                runs[family] = run = run_job(family, model_dir, redis.url, workdir)
                peaks = ", ".join(f"{w.name} {w.peak_bytes / 1e9:.2f} GB" for w in (*run.workers, run.coordinator))
                say(f"{family} job done in {run.coordinator.seconds:.0f} s: peak RSS {peaks}; update shares {update_shares(run.workers)}; late join {run.late_join_s}")
        say("replaying the low-rank ledger")
        replay = replay_figures(runs["lowrank"], workdir)
    except BaseException:
        say(f"failed: the processes' logs are kept in {workdir}")
        raise
    parameters = measured["parameters"]
    shares = {family: update_shares(run.workers) for family, run in runs.items()}
    figures: dict[str, Any] = {
        "worker_bytes_per_param_lowrank": max(w.peak_bytes for w in runs["lowrank"].workers) / parameters,
        "worker_bytes_per_param_dense": max(w.peak_bytes for w in runs["dense"].workers) / parameters,
        "coordinator_peak_gb": max(run.coordinator.peak_bytes for run in runs.values()) / 1e9,
        "replay_bytes_per_param": replay["peak_bytes"] / parameters,
        "update_share_lowrank": statistics.median(shares["lowrank"]),
        "update_share_dense": statistics.median(shares["dense"]),
        "dense_update_vs_reference": measured["dense_update_vs_reference"],
        "lowrank_vs_decoding": measured["lowrank_vs_decoding"],
        "replay_s_per_iteration": replay["s_per_iteration"],
        "late_join_s": runs["lowrank"].late_join_s,
    }
    report = {
        **{key: None if value is None else round(value, 3) for key, value in figures.items()},
        "goals": {key: f"{op} {bound}" for key, (op, bound) in GOALS.items()},
        "meets_goals": verdicts(figures),
        "details": {
            "model": str(model_dir),
            "shape": shape,
            "parameters": parameters,
            "update_shares_per_iteration": {family: [round(s, 3) for s in values] for family, values in shares.items()},
            "replay_matches_worker": replay["matches_worker"],
            "replay_s": round(replay["seconds"], 2),
            **{key: value for key, value in measured.items() if key not in figures and key != "parameters"},
            "worker_peak_gb": {w.name: round(w.peak_bytes / 1e9, 3) for run in runs.values() for w in run.workers},
            "coordinator_peak_gb": {family: round(run.coordinator.peak_bytes / 1e9, 3) for family, run in runs.items()},
            "job_seconds": {family: round(run.coordinator.seconds, 1) for family, run in runs.items()},
        },
        "workload": {"population": POPULATION, "antithetic": True, "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "iterations": ITERATIONS},
        "machine": {"cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(), "load_1min_before": load_before,
                    "load_1min_after": os.getloadavg()[0]},
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)  # the logs were read above
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
