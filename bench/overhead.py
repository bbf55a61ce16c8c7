"""Protocol overhead bench: the share of each iteration's wall time not spent evaluating, on the tiny-model job.

Run with no arguments (about a minute on 2 CPU cores). Progress goes to stderr; the last line on stdout
is one JSON object.

The job is examples/smoke.toml (builtin:tiny, the demo task) with more iterations, run for real on
loopback: `swarmtune coordinator` over its embedded Redis (AOF fsynced on every write) and one
`swarmtune worker` (one torch thread, capacity = the population, base model preloaded). Times:
  wall       coordinator timestamps: from iteration t-1 closed to iteration t closed (everything);
  evaluation worker timing: the members' rewards measured by the backend (and retention, if due);
  apply      worker timing: verifying iteration t-1's entry, the exact update, deriving the center;
  close      coordinator timing: shaping, sealing and appending iteration t's entry;
  other      the rest: announcements, signing, submissions, attestations, scheduling.
overhead_share = 1 - Σ evaluation / Σ wall over the measured iterations (goal <= 0.05); the first
WARMUP iterations (joining, first-call allocations) are left out. smoke.toml is the least work per
iteration of any example (~70 ms here), so its share is the protocol's worst case; `demo_job` gives the
same figures for examples/demo.toml (the job `swarmtune demo` runs) beside it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from swarmtune import identity
from swarmtune.jobspec import parse_job_spec
from swarmtune.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "smoke.toml"
# The demo's job, for comparison: the same model with a realistic amount of work per iteration.
DEMO = ROOT / "examples" / "demo.toml"
ITERATIONS = 64
DEMO_ITERATIONS = 24
WARMUP = 4
TIMEOUT_S = 480.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_spec(source: Path, iterations: int) -> bytes:
    """A job of examples/ with `iterations` iterations, under its own job id."""
    text = source.read_text()
    text, ids = re.subn(r'(?m)^id = ".*"$', f'id = "overhead-bench-{source.stem}"', text)
    text, counts = re.subn(r"(?m)^iterations = \d+", f"iterations = {iterations}", text)
    if (ids, counts) != (1, 1):
        raise SystemExit(f"{source} no longer has one `id = ...` and one `iterations = ...` line; update this bench")
    return text.encode()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith('{"ts')]


def run_job(work: Path, spec_path: Path, model_dir: Path, population: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Coordinator and worker to completion; their JSON-line events."""
    coordinator_key, worker_key = work / "coordinator.key", work / "worker.key"
    for path in (coordinator_key, worker_key):
        identity.save_private_key(identity.generate_key(), path)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    swarmtune = [sys.executable, "-m", "swarmtune"]
    coordinator_log, worker_log = work / "coordinator.log", work / "worker.log"
    with coordinator_log.open("w") as out:
        coordinator = subprocess.Popen(
            [*swarmtune, "coordinator", "--job", str(spec_path), "--data-dir", str(work / "redis"), "--key", str(coordinator_key),
             "--listen", address, "--admit", str(worker_key), "--log-json"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    with worker_log.open("w") as out:
        worker = subprocess.Popen(
            [*swarmtune, "worker", "--coordinator", address, "--key", str(worker_key), "--model", str(model_dir),
             "--capacity", str(population), "--log-json"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        if coordinator.wait(TIMEOUT_S) != 0 or worker.wait(60) != 0:
            raise SystemExit(f"the job failed:\n{coordinator_log.read_text()[-3000:]}\n{worker_log.read_text()[-3000:]}")
    finally:
        for process in (coordinator, worker):
            if process.poll() is None:
                process.kill()
    return events(coordinator_log), events(worker_log)


def per_iteration(coordinator: list[dict[str, Any]], worker: list[dict[str, Any]], iterations: int) -> list[dict[str, float]]:
    """Wall, evaluation, apply and close seconds of every measured iteration."""
    closed = {e["iteration"]: e for e in coordinator if e["event"] == "iteration closed"}
    rows = []
    for t in range(WARMUP + 1, iterations + 1):
        evaluation = sum(e["seconds"] for e in worker if e["event"] in ("evaluated", "retention") and e["iteration"] == t)
        apply = sum(e["seconds"] for e in worker if e["event"] == "applied" and e["iteration"] == t - 1)
        wall = closed[t]["ts"] - closed[t - 1]["ts"]
        rows.append({"wall": wall, "evaluation": evaluation, "apply": apply, "close": closed[t]["close_ms"] / 1000})
    return rows


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    total = {key: sum(row[key] for row in rows) for key in ("wall", "evaluation", "apply", "close")}
    other = total["wall"] - total["evaluation"] - total["apply"] - total["close"]
    return {
        "iterations_measured": len(rows),
        "wall_s_per_iteration": round(total["wall"] / len(rows), 4),
        "evaluation_s_per_iteration": round(total["evaluation"] / len(rows), 4),
        "wall_s_median": round(statistics.median(r["wall"] for r in rows), 4),
        "breakdown_share": {
            "evaluation": round(total["evaluation"] / total["wall"], 4),
            "apply": round(total["apply"] / total["wall"], 4),
            "close": round(total["close"] / total["wall"], 4),
            "other": round(other / total["wall"], 4),
        },
        "overhead_share": round(1 - total["evaluation"] / total["wall"], 4),
    }


def measure(source: Path, iterations: int) -> dict[str, Any]:
    """Run `source` for `iterations` with one worker; its summary."""
    spec_bytes = bench_spec(source, iterations)
    spec = parse_job_spec(spec_bytes)
    log(f"resolving {spec.model} (builds builtin:tiny on first use)")
    model_dir = resolve_model(spec.model)
    with tempfile.TemporaryDirectory(prefix="swarmtune-overhead-") as tmp:
        work = Path(tmp)
        spec_path = work / "job.toml"
        spec_path.write_bytes(spec_bytes)
        log(f"running {iterations} iterations of {source.name} (population {spec.population}) with one worker")
        coordinator, worker = run_job(work, spec_path, model_dir, spec.population)
    result = summary(per_iteration(coordinator, worker, iterations))
    result.update(job=source.name, population=spec.population, prompts=spec.prompts_per_iteration)
    return result


def main() -> None:
    started = time.monotonic()
    result = measure(SMOKE, ITERATIONS)
    demo = measure(DEMO, DEMO_ITERATIONS)
    keys = ("overhead_share", "wall_s_per_iteration", "evaluation_s_per_iteration", "breakdown_share", "job", "population", "prompts")
    result.update(demo_job={key: demo[key] for key in keys}, wall_s=round(time.monotonic() - started, 1))
    log(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
