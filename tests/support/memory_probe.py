"""Peak host memory of the real worker path (replica, HF backend, members, one exact update), printed
as one JSON line next to what swarmtune.memory predicts: run in a fresh process by tests/core/test_memory.py."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--family", choices=["dense", "lowrank"], required=True)
    parser.add_argument("--decay", type=float, default=0.0)
    parser.add_argument("--cache-mb", type=int, default=0)
    parser.add_argument("--keep-frozen", action="store_true", help="frozen tensors' Q resident (as before 0.2's spill), to compare")
    args = parser.parse_args()

    import torch

    from swarmtune import memory
    from swarmtune.backends.hf import HFBackend
    from swarmtune.models import load_model
    from swarmtune.noise import NoiseConfig
    from swarmtune.noisecache import NoiseCache
    from swarmtune.replay import Replica, ReplayParams
    from swarmtune.seeds import population
    from swarmtune.state import MasterState, build_plan, master_from_model
    from swarmtune.tasks.base import Example
    from swarmtune.update import IterationUpdate, apply_iteration_, decay_integer

    torch.set_num_threads(1)
    gc.collect()
    imported = status_bytes("VmRSS")  # this environment's fixed cost: Python, torch, transformers, swarmtune
    model, tokenizer = load_model(args.model)
    gc.collect()
    loaded = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: peaks of loading are not the worker's

    noise = NoiseConfig(args.family, "gaussian", rank=1)
    base = master_from_model(model, build_plan(model, args.family))
    if args.keep_frozen:
        base = MasterState(base.specs, tuple(base.whole(index) for index in range(len(base.specs))))
    replica = Replica(ReplayParams(noise, decay_integer(args.decay)), base)
    del base
    cache = NoiseCache(args.cache_mb << 20)
    backend = HFBackend(model, tokenizer, replica.state, noise, 0.01, "cpu", noise_cache=cache)
    members = population(7, 1, 4, antithetic=True)
    backend.evaluate(members, [Example("12+34=", {})], lambda prompts, completions, **_: [float(len(c)) for c in completions], 2)
    change = IterationUpdate(members, (9_000_000, -9_000_000, 4_000_000, 1))
    apply_iteration_(replica.state, change, noise, replica.base, replica.params.decay, cache)
    backend.set_center(replica.state)
    backend.generate(["12+34="], 2)
    replica.state_hash()
    budget = memory.worker_memory(replica.state.specs, model.dtype.itemsize, "cpu", args.cache_mb << 20)
    frozen = budget.parameters - memory.resident_count(replica.state.specs)
    print(json.dumps({
        "parameters": budget.parameters,
        "frozen": frozen,
        "resident": budget.parameters - (0 if args.keep_frozen else frozen),
        "imported_rss": imported,
        "loaded_rss": loaded,
        "peak_rss": status_bytes("VmHWM"),
        "predicted_host": budget.host_bytes,
        "predicted_after_load": budget.host_bytes - memory.PROCESS_BYTES - model.dtype.itemsize * budget.parameters
        + (4 * frozen if args.keep_frozen else 0),
        "scratch": memory.scratch_bytes(replica.state.specs),
    }))


if __name__ == "__main__":
    main()
