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

    from transformers import AutoModelForCausalLM

    from swarmtune import state
    from swarmtune.models import resolve_model

    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    master = state.master_from_model(model, state.build_plan(model, "dense"))
    digest = state.state_hash(master).hex()
    if args.json:
        params = sum(spec.numel for spec in master.specs)
        print(json.dumps({"model": str(path), "state_hash": digest, "tensors": len(master.specs), "parameters": params,
                          "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}))
    else:
        print(digest)
    return 0
