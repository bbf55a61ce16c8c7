"""`swarmtune worker --backend vllm` as a real process: a job with an HF worker replays; no engine outlives it."""

from __future__ import annotations

import contextlib
import re
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from tests.support.cluster import Cluster, iterations, key_of, spec_text
from tests.support.processes import Proc
from tests.support.specs import job_spec

pytestmark = pytest.mark.vllm

LOWRANK = {"family": "lowrank", "rank": 1, "lowrank_others": "frozen"}
FAILING_TASK = Path(__file__).with_name("failing_task.py")
ENGINE_UP_S = 240.0  # a vLLM engine starts in ~25 s alone, slower next to a coordinator and an HF worker on 2 cores

MakeCluster = Callable[[str, str], Cluster]


@pytest.fixture
def cluster_of(tmp_path: Path, redis_url: str, head64_dir: Path) -> Iterator[MakeCluster]:
    """make(name, spec) -> a Cluster on the head-64 model (processes started from scratch: vLLM spawns its own)."""
    started: list[Cluster] = []

    def make(name: str, spec: str) -> Cluster:
        cluster = Cluster(tmp_path / name, redis_url, head64_dir, spec)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        engines = [p for proc in cluster.procs for p in engine_processes(proc)]
        cluster.close()
        for process in engines:  # a failed test's SIGKILLed worker must not leave its engine behind either
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def engine_processes(proc: Proc) -> list[psutil.Process]:
    """The live processes vLLM started for a worker, found by the pids vLLM prefixes to its log lines
    (`(EngineCore pid=N)`): they rename themselves, and an orphan no longer descends from the worker."""
    pids = {int(pid) for pid in re.findall(r"^\((?:EngineCore|VllmWorker|Worker)[^)]* pid=(\d+)\)", proc.text(), re.M)}
    alive = []
    for pid in pids - {proc.popen.pid}:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def started_engine(worker: Proc) -> set[int]:
    """The pids of the worker's engine processes, checked to be its descendants now."""
    engines = {p.pid for p in engine_processes(worker)}
    assert engines, f"no vLLM engine process in the worker's log:\n{worker.tail()}"
    assert engines <= {p.pid for p in psutil.Process(worker.popen.pid).children(recursive=True)}
    return engines


def assert_no_engine_left(worker: Proc, within_s: float = 30.0) -> None:
    """Every engine process gone (or a zombie) within `within_s`; polled: an orphan is no child of ours."""
    deadline = time.monotonic() + within_s
    while (alive := engine_processes(worker)) and time.monotonic() < deadline:
        psutil.wait_procs(alive, timeout=1)
    assert not alive, f"left running after the worker exited: {[(p.pid, p.name()) for p in alive]}\n{worker.tail()}"


def test_a_job_with_an_hf_and_a_vllm_worker_closes_every_iteration_and_replays(cluster_of: MakeCluster, job_id: str, head64_dir: Path) -> None:
    cluster = cluster_of("mixed", spec_text(job_id, head64_dir, iterations=3, population=6, deadline=240.0, noise=LOWRANK))
    coordinator = cluster.coordinator("--serve-after", "--min-workers", "2")
    workers = [cluster.worker(0), cluster.worker(1, "--backend", "vllm")]
    cluster.finish(coordinator, workers, timeout=ENGINE_UP_S + 120)
    stored, replayed, summary = cluster.checked_ledger(workers)
    assert summary["iteration"] == 3 and sorted(replayed) == [1, 2, 3]
    done = iterations(stored)
    assert [it.iteration for it in done] == [1, 2, 3] and all(len(it.results) == 6 for it in done)
    by_worker = {r.worker_key for it in done for r in it.results}
    assert by_worker == {key_of(cluster.worker_keys[0]), key_of(cluster.worker_keys[1])}
    assert any(len(e["members"]) > 1 for e in workers[1].events("evaluated")), "the vLLM worker never batched adapters"
    assert any(c != 0 for it in done for c in it.coefficients), "rewards never varied: the test proves nothing"


def evaluating_vllm_worker(cluster_of: MakeCluster, name: str, job_id: str, head64_dir: Path) -> Proc:
    """A vLLM worker on a long job, once it has evaluated members (its engine is up and checked)."""
    cluster = cluster_of(name, spec_text(job_id, head64_dir, iterations=100, population=4, deadline=240.0, noise=LOWRANK))
    cluster.coordinator("--serve-after", "--min-workers", "1")
    worker = cluster.worker(0, "--backend", "vllm")
    worker.wait_for("evaluated", ENGINE_UP_S)
    started_engine(worker)
    return worker


def test_sigterm_stops_the_worker_and_its_engine(cluster_of: MakeCluster, job_id: str, head64_dir: Path) -> None:
    worker = evaluating_vllm_worker(cluster_of, "sigterm", job_id, head64_dir)
    worker.send(signal.SIGTERM)
    assert worker.wait(120) == 0, worker.tail()
    assert_no_engine_left(worker)


def test_a_killed_worker_takes_its_engine_down(cluster_of: MakeCluster, job_id: str, head64_dir: Path) -> None:
    worker = evaluating_vllm_worker(cluster_of, "sigkill", job_id, head64_dir)
    worker.kill()  # SIGKILL: no finalizer runs, only the engine's own watch on its owner
    assert_no_engine_left(worker)


def test_an_evaluation_error_stops_the_worker_and_its_engine(cluster_of: MakeCluster, job_id: str, head64_dir: Path) -> None:
    task = {"name": f"{FAILING_TASK}:TASK", "prompts_per_iteration": 2, "max_new_tokens": 4}
    spec = job_spec(job_id, model=head64_dir, seed=1, iterations=5, task=task, es={"population": 2}, noise=LOWRANK, schedule={"deadline_seconds": 240.0})
    cluster = cluster_of("failing", spec)
    cluster.coordinator("--serve-after", "--min-workers", "1")
    worker = cluster.worker(0, "--backend", "vllm")
    assert worker.wait(ENGINE_UP_S + 60) != 0, worker.tail()
    assert "this reward function always fails" in worker.text() and "SwarmtuneWorkerExtension" in worker.text(), worker.tail()
    assert_no_engine_left(worker)
