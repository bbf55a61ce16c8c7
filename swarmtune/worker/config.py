"""The worker's settings, as given on the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class WorkerConfig:
    """Where to connect, who we are, and how this machine evaluates."""

    coordinator: str  # HOST:PORT
    key_path: Path
    device: str = "cpu"
    backend: str = "hf"
    tls_ca: Path | None = None  # PEM roots to verify the coordinator; None: plaintext (loopback, tests)
    model: str | None = None  # local base model directory overriding the job spec's model
    capacity: int = 16  # members this worker offers to evaluate per iteration
    noise_cache_mb: int | None = None  # noise kept from evaluation for the update (0: draw it again; None: the job's default)
    operator: str = ""  # who runs this worker ("": the key's fingerprint, i.e. an operator of its own)
    log_json: bool = False
    snapshot: str | None = None  # path or http(s) URL of a snapshot at a checkpoint: replay only the tail
