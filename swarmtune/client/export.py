"""Export: the Hugging Face model directory of a job at any iteration, with the weights workers evaluated."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import torch

from swarmtune.client.weightfiles import copy_model_files, write_weight_files
from swarmtune.entries import Genesis, Iteration, StoredEntry
from swarmtune.models import load_model
from swarmtune.replay import OnIteration, ReplayResult, replay, replay_replica, replica_from_files
from swarmtune.state import write_weights
from swarmtune.statefiles import NotStreamable, StateFileError, state_files

log = logging.getLogger(__name__)

PROVENANCE_FILE = "swarmtune.json"


class ExportError(Exception):
    """The model cannot be exported as asked; the message says what to do."""


@dataclass(frozen=True)
class Exported:
    """An exported model: where, which job and iteration, and the state it was derived from."""

    directory: Path
    job_id: str
    iteration: int
    state_hash: bytes
    entry_hash: bytes  # hash of the last ledger entry replayed: the ledger prefix this model follows from
    dtype: str

    def provenance(self) -> dict[str, Any]:
        """What the directory's swarmtune.json records: the model's place in its ledger."""
        return {
            "job_id": self.job_id,
            "iteration": self.iteration,
            "state_hash": self.state_hash.hex(),
            "entry_hash": self.entry_hash.hex(),
            "dtype": self.dtype,
        }

    def to_json(self) -> dict[str, Any]:
        return {"directory": str(self.directory), **self.provenance()}


def check_out_dir(out: Path) -> None:
    """An export never mixes its files with others: `out` must be new or empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new --out directory")


def export_model(
    model_dir: Path,
    verified: Sequence[StoredEntry],
    out: Path,
    iteration: int | None = None,
    on_iteration: OnIteration | None = None,
) -> Exported:
    """Replay verified entries from the base model in `model_dir` to `iteration` (None: the last one),
    and write config, safetensors and tokenizer to `out`, weights derived in the base model's dtype.

    Safetensors base files are streamed (the master state and chunk-sized temporaries in memory, the model
    never loaded); others are loaded and saved with save_pretrained.
    Raises replay.ReplayError when `model_dir` is not the job's base model.
    """
    check_out_dir(out)
    last = max((e.entry.body.iteration for e in verified if isinstance(e.entry.body, Iteration)), default=0)
    if iteration is not None and not 0 <= iteration <= last:
        raise ExportError(f"iteration {iteration} is not in the ledger, which holds iterations 0 to {last}; pass one of those")
    try:
        files = state_files(model_dir)
    except NotStreamable as reason:
        log.info("loading the whole model to export it: %s", reason, extra={"model": str(model_dir)})
        return _export_loaded(model_dir, verified, out, iteration, on_iteration)
    except StateFileError as exc:
        raise ExportError(f"{exc}: pass the job's base model") from None
    result = replay_replica(replica_from_files(model_dir, cast(Genesis, verified[0].entry.body)), verified, iteration, on_iteration)
    out.mkdir(parents=True, exist_ok=True)
    write_weight_files(model_dir, files, result.replica.state, out)
    copy_model_files(model_dir, out, exclude=(PROVENANCE_FILE,))
    return _record(out, verified, result, files.dtype)


def _export_loaded(
    model_dir: Path, verified: Sequence[StoredEntry], out: Path, iteration: int | None, on_iteration: OnIteration | None
) -> Exported:
    """export_model for files only transformers reads: load, replay, write the derived weights, save_pretrained."""
    model, tokenizer = load_model(model_dir)
    result = replay(model, verified, iteration, on_iteration)
    # Exactly what a worker's backend writes for its center model (HFBackend.set_center).
    write_weights(model, result.replica.state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return _record(out, verified, result, model.dtype)


def _record(out: Path, verified: Sequence[StoredEntry], result: ReplayResult, dtype: torch.dtype) -> Exported:
    """The export's provenance, written to `out` beside the model."""
    exported = Exported(
        directory=out,
        job_id=verified[0].entry.job_id,
        iteration=result.iteration,
        state_hash=result.state_hash,
        entry_hash=result.head_hash,
        dtype=str(dtype).removeprefix("torch."),
    )
    (out / PROVENANCE_FILE).write_text(json.dumps(exported.provenance(), indent=1) + "\n")
    return exported
