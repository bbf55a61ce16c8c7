"""`swarmtune hash`: the canonical state hash of a model directory's genesis state."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model directory, or builtin:tiny")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from swarmtune.cli import CommandError

    if not args.model.startswith("builtin:") and not Path(args.model).is_dir():
        raise CommandError(f"{args.model} is not a directory; pass a local model directory (config.json + weights)")

    from swarmtune.models import ModelResolutionError, resolve_model
    from swarmtune.statefiles import StateFileError, genesis_base_state

    try:
        path = resolve_model(args.model)
        # Streamed from the safetensors files: no state is held, whatever the model's size.
        base = genesis_base_state(path, "dense", "frozen")
    except (ModelResolutionError, StateFileError, OSError) as exc:
        raise CommandError(f"cannot hash {args.model}: {exc}") from None
    digest = base.state_hash.hex()
    if args.json:
        params = sum(spec.numel for spec in base.plan)
        print(json.dumps({"model": str(path), "state_hash": digest, "tensors": len(base.plan), "parameters": params,
                          "dtype": str(base.dtype).removeprefix("torch.")}))
    else:
        print(digest)
    return 0
