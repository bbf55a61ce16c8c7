"""What a worker process holds besides its state: capped malloc arenas, a tokenizer without its build sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from swarmtune.modelbuild import build_qwen2_model
from swarmtune.models import load_model
from swarmtune.worker.site import load_base_model

ROOT = Path(__file__).resolve().parents[2]
THREADS = 6

# Threads that all allocate while alive together, then glibc's malloc_stats (one "Arena N:" block per
# arena, on stderr); `start` runs first in the main thread.
ARENAS_PROGRAM = """
import ctypes, sys, threading
barrier = threading.Barrier({threads})
def allocate():
    held = [bytearray(4096) for _ in range(64)]
    barrier.wait()
def count_arenas(*_):
    threads = [threading.Thread(target=allocate) for _ in range({threads})]
    for thread in threads: thread.start()
    for thread in threads: thread.join()
    ctypes.CDLL(None).malloc_stats()
    return 0
{start}
"""
# The worker's own start (`swarmtune worker`) up to where it would serve.
WORKER_START = """
import swarmtune.worker.daemon
swarmtune.worker.daemon.serve = count_arenas
sys.argv = ["swarmtune", "worker", "--coordinator", "127.0.0.1:1", "--key", "unused.key"]
from swarmtune.cli import entry
entry()
"""


def arenas_after(start: str) -> int:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    program = ARENAS_PROGRAM.format(threads=THREADS, start=start)
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_a_worker_caps_malloc_arenas_before_its_threads_start() -> None:
    """Every thread of a worker (compute, attestation, gRPC's, signature verifiers) would get an arena of
    its own, each keeping what its thread freed resident (the 0.5B dense worker: 7.01-7.07 -> 6.94 B/param
    with the tokenizer's release); the worker's start caps them at two."""
    uncapped = arenas_after("count_arenas()")
    assert uncapped > THREADS  # glibc's default: a new arena per thread that allocates (the check can fail)
    assert arenas_after(WORKER_START) <= 2


def python_objects_as_large_as(tokenizer: Any, count: int) -> list[str]:
    """Attributes of `tokenizer` holding a Python dict, list or tuple of at least `count` entries."""
    return [name for name, value in vars(tokenizer).items() if isinstance(value, (dict, list, tuple)) and len(value) >= count]


def test_the_worker_tokenizer_drops_its_python_vocabulary_and_encodes_the_same(tmp_path: Path) -> None:
    """A Rust-backed tokenizer keeps the vocabulary and merges it was built from as Python objects (17 MB
    at 152k tokens); the worker's copy releases them and still encodes and decodes every id alike."""
    vocab = 20_000
    directory = build_qwen2_model(tmp_path, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=vocab)
    _, full = load_model(directory)
    worker = load_base_model(str(directory), "cpu").tokenizer
    assert python_objects_as_large_as(full, vocab)  # what there is to release (the check can fail)
    assert python_objects_as_large_as(worker, vocab) == []
    texts = ["12+34=", "Hello, world!", "(7*8)-9 ="]
    assert worker(texts, padding=True).input_ids == full(texts, padding=True).input_ids
    ids = list(range(vocab - 50, vocab)) + [5, 6, 7]
    assert worker.decode(ids, skip_special_tokens=True) == full.decode(ids, skip_special_tokens=True)
    assert worker.pad_token_id == full.pad_token_id and worker.padding_side == "left"
