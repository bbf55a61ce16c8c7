"""builtin:tiny: the demo model's pretraining recipe, its shipped weights and their atomic install in the cache.

Pretraining is float backprop, so two CPUs build different weights from one recipe; every site of a
job needs the same base model bit for bit, so the package ships one build (`swarmtune/weights/`) and
`builtin:tiny` installs it. `python -m swarmtune.tinymodel --out DIR [--ship]` builds anew (and
makes that build the shipped one).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from swarmtune.modelbuild import build_tokenizer, initialise_weights, tiny_llama_config
from swarmtune.modelpaths import ModelResolutionError
from swarmtune.tasks.base import DatasetTask, Example
from swarmtune.tasks.demo import addition_task, exact_match, reversal_task

TINY_NAME = "tiny-v2"  # bump with any change to the shipped weights, the tasks or the tokenizer
MANIFEST = "manifest.json"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# What a build records about itself (its manifest without the file list) and ships beside its weights.
BUILD_FACTS = ("recipe", "pretraining", "held_out_accuracy", "versions", "weights_sha256")


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines builtin:tiny (with the demo datasets and the tokenizer)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    seed: int = 3  # of seeds 0-3 built on one machine, the clearest demo gain (see README)
    threads: int = 1  # fixed, so float reductions (and the result) do not depend on the machine's cores
    batch_size: int = 128
    learning_rate: float = 6e-3
    warmup_steps: int = 100
    probe_target: float = 0.97  # phase 1 trains the probe alone until it is this accurate...
    task_target: float = 0.40  # ...phase 2 adds the demo task and stops as soon as it reaches this
    task_share: float = 0.5  # of each phase-2 batch; the rest rehearses the probe
    max_steps: int = 2000
    check_every: int = 10
    check_examples: int = 256  # a fixed sample of the train splits; held-out data never steers training


@dataclass(frozen=True)
class PretrainReport:
    """What one pretraining run did."""

    steps: int
    probe_steps: int  # steps of phase 1
    first_loss: float
    final_loss: float
    seconds: float  # wall time
    cpu_seconds: float  # this process's CPU time: what the wall time is on an idle machine (one thread)


@dataclass(frozen=True)
class HeldOutAccuracy:
    """Greedy exact-match accuracy of the two skills on their held-out splits."""

    task: float
    probe: float


@dataclass(frozen=True)
class Row:
    """One tokenized training sequence and its loss targets."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Phase:
    """One stage of pretraining: which datasets feed the batches and when to stop."""

    name: str
    sources: tuple[Sequence[Row], ...]
    shares: tuple[float, ...]
    done: Callable[[], bool]


def tiny_dir(root: Path) -> Path:
    """The cache directory of builtin:tiny under a swarmtune cache root."""
    return root / "models" / TINY_NAME


def ensure_tiny(root: Path) -> Path:
    """The cached builtin:tiny directory, installed from the shipped weights (once, under a lock,
    atomically) on first use. Another install (older weights) is replaced: the cache only holds
    derived data."""
    target = tiny_dir(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f"{TINY_NAME}.lock"):
        # Scratch directories of installs that were killed (SIGKILL skips their cleanup); the lock
        # means no install is running now.
        for stale in target.parent.glob(f".{TINY_NAME}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if not is_current(target):
            install_atomically(target)
    verify_manifest(target)
    return target


def shipped_facts() -> dict[str, Any]:
    """What the shipped build recorded about itself (recipe, run, held-out accuracy, weights hash)."""
    return dict(json.loads((WEIGHTS_DIR / f"{TINY_NAME}.json").read_text()))


def is_current(directory: Path) -> bool:
    """Whether directory holds a complete install (it has a manifest) of the shipped weights."""
    if not (directory / MANIFEST).is_file():
        return False
    return read_manifest(directory).get("weights_sha256") == shipped_facts()["weights_sha256"]


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive file lock: concurrent processes wait for one install instead of racing."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def install_atomically(target: Path) -> None:
    """Install into a temporary sibling and rename it into place: readers never see half a model."""
    if target.exists():
        shutil.rmtree(target)  # another install: rename cannot replace a non-empty directory
    scratch = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=target.parent))
    try:
        install_tiny(scratch)
        scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def install_tiny(out_dir: Path) -> Path:
    """The shipped weights into out_dir, with the tokenizer and config of their recipe and a manifest."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    facts = shipped_facts()
    weights = WEIGHTS_DIR / f"{TINY_NAME}.safetensors"
    if hashlib.sha256(weights.read_bytes()).hexdigest() != facts["weights_sha256"]:
        raise ModelResolutionError(f"{weights} does not match its recorded sha256; reinstall swarmtune")
    recipe = TinyRecipe(**facts["recipe"])
    model = LlamaForCausalLM(tiny_config(build_tokenizer(out_dir), recipe))
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.save_pretrained(str(out_dir))
    write_manifest(out_dir, facts)
    return out_dir


def tiny_config(tokenizer: Any, recipe: TinyRecipe) -> Any:
    return tiny_llama_config(
        tokenizer,
        hidden=recipe.hidden,
        layers=recipe.layers,
        heads=recipe.heads,
        intermediate=recipe.intermediate,
        tie_word_embeddings=False,
    )


def build_tiny(out_dir: Path, recipe: TinyRecipe = TinyRecipe(), progress: bool = True) -> Path:
    """Pretrain builtin:tiny into out_dir: model, tokenizer and a manifest with its content hash."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = tiny_config(tokenizer, recipe)
    task, probe = addition_task(), reversal_task()
    with torch_threads(recipe.threads):
        model = LlamaForCausalLM(config)
        initialise_weights(model, recipe.seed)
        report = pretrain(model, tokenizer, task, probe, recipe, progress)
        model.eval()
        accuracy = HeldOutAccuracy(
            task=greedy_accuracy(model, tokenizer, task.held_out()),
            probe=greedy_accuracy(model, tokenizer, probe.held_out()),
        )
    model.save_pretrained(str(out_dir))
    write_manifest(
        out_dir,
        {
            "recipe": asdict(recipe),
            "pretraining": asdict(report),
            "held_out_accuracy": asdict(accuracy),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "weights_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
        },
    )
    return out_dir


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with a fixed intra-op thread count, restoring the caller's afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(
    model: Any, tokenizer: Any, task: DatasetTask, probe: DatasetTask, recipe: TinyRecipe, progress: bool = True
) -> PretrainReport:
    """Two phases of ordinary backprop: the probe skill to mastery, then the demo task to mediocrity.

    Stopping the demo task at `task_target` leaves it mid-way up its learning curve, where its
    errors are near misses that small weight changes fix: the smooth, improvable regime ES needs.
    """
    import torch
    from tqdm.auto import tqdm

    rng = random.Random(recipe.seed)
    task_checks = rng.sample(list(task.train()), recipe.check_examples)
    probe_checks = rng.sample(list(probe.train()), recipe.check_examples)

    def probe_learned() -> bool:
        return greedy_accuracy(model, tokenizer, probe_checks) >= recipe.probe_target

    def task_learned() -> bool:
        return greedy_accuracy(model, tokenizer, task_checks) >= recipe.task_target

    task_rows, probe_rows = encode_for_training(tokenizer, task.train()), encode_for_training(tokenizer, probe.train())
    phases = (
        Phase("probe", (probe_rows,), (1.0,), probe_learned),
        Phase("task", (task_rows, probe_rows), (recipe.task_share, 1 - recipe.task_share), task_learned),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup_steps))
    losses: list[float] = []
    phase_ends: list[int] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    with tqdm(total=recipe.max_steps, desc="pretraining builtin:tiny", disable=not progress, leave=False) as bar:
        for phase in phases:
            while len(losses) < recipe.max_steps:
                batch = mixed_batch(rng, phase.sources, phase.shares, recipe.batch_size)
                losses.append(train_step(model, optimizer, batch, tokenizer.pad_token_id))
                schedule.step()
                bar.update(1)
                bar.set_postfix(phase=phase.name, loss=f"{losses[-1]:.3f}")
                if len(losses) % recipe.check_every == 0 and stopped(model, phase.done):
                    break
            phase_ends.append(len(losses))
    return PretrainReport(
        steps=len(losses),
        probe_steps=phase_ends[0],
        first_loss=losses[0],
        final_loss=losses[-1],
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - start_cpu,
    )


def stopped(model: Any, done: Callable[[], bool]) -> bool:
    """Evaluate a stopping check in eval mode (train_step switches back)."""
    model.eval()
    return done()


def mixed_batch(
    rng: random.Random, sources: tuple[Sequence[Row], ...], shares: tuple[float, ...], size: int
) -> list[Row]:
    """A batch drawing round(share * size) examples from each source (the last takes the rest)."""
    counts = [round(share * size) for share in shares[:-1]]
    counts.append(size - sum(counts))
    return [rng.choice(source) for source, count in zip(sources, counts) for _ in range(count)]


def train_step(model: Any, optimizer: Any, batch: Sequence[Row], pad_token_id: int) -> float:
    """One AdamW step on the completion-only loss of batch."""
    model.train()
    input_ids, attention_mask, labels = collate(batch, pad_token_id)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def encode_for_training(tokenizer: Any, examples: Sequence[Example]) -> list[Row]:
    """<bos> prompt answer <eos> per example; only answer and <eos> tokens carry loss (-100 elsewhere)."""
    prompts = tokenizer([example.prompt for example in examples]).input_ids
    answers = tokenizer([example.columns["answer"] for example in examples], add_special_tokens=False).input_ids
    rows = []
    for prompt, answer in zip(prompts, answers):
        completion = answer + [tokenizer.eos_token_id]
        rows.append(Row(tuple(prompt + completion), tuple([-100] * len(prompt) + completion)))
    return rows


def collate(batch: Sequence[Row], pad_token_id: int) -> tuple[Any, Any, Any]:
    """Right-padded (input_ids, attention_mask, labels) tensors."""
    import torch

    width = max(len(row.input_ids) for row in batch)
    input_ids = torch.full((len(batch), width), pad_token_id)
    labels = torch.full((len(batch), width), -100)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for index, row in enumerate(batch):
        length = len(row.input_ids)
        input_ids[index, :length] = torch.tensor(row.input_ids)
        labels[index, :length] = torch.tensor(row.labels)
        attention_mask[index, :length] = 1
    return input_ids, attention_mask, labels


def greedy_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example]) -> float:
    """Exact-match accuracy of greedy completions (just long enough for the longest answer)."""
    import torch

    answers = [example.columns["answer"] for example in examples]
    encoded = tokenizer([example.prompt for example in examples], return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(
            **encoded,
            max_new_tokens=max(map(len, answers)) + 1,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = tokenizer.batch_decode(output[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)
    prompts = [example.prompt for example in examples]
    return sum(exact_match(prompts, completions, answers)) / len(examples)


def write_manifest(out_dir: Path, facts: dict[str, Any]) -> None:
    """The build's facts (BUILD_FACTS) and a content hash over every file written."""
    files = file_hashes(out_dir)
    manifest = {"name": TINY_NAME, "content_hash": content_hash(files), "files": files, **{key: facts[key] for key in BUILD_FACTS}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def ship(build_dir: Path) -> None:
    """Make a build the shipped builtin:tiny: its weights and facts into swarmtune/weights/."""
    manifest = read_manifest(build_dir)
    shutil.copyfile(build_dir / "model.safetensors", WEIGHTS_DIR / f"{TINY_NAME}.safetensors")
    facts = {key: manifest[key] for key in BUILD_FACTS}
    (WEIGHTS_DIR / f"{TINY_NAME}.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in directory except the manifest, by name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


def content_hash(files: dict[str, str]) -> str:
    """One sha256 over the sorted (name, file hash) pairs."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())


def verify_manifest(directory: Path) -> None:
    """Check the files against the manifest; a mismatch means a damaged cache."""
    recorded = read_manifest(directory)["files"]
    if file_hashes(directory) != recorded:
        raise ModelResolutionError(
            f"the cached builtin:tiny in {directory} does not match its manifest; "
            "delete that directory and it will be installed again"
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m swarmtune.tinymodel [--out DIR [--ship]]`: install builtin:tiny into the cache, or
    pretrain it anew into DIR (and make that build the one the package ships)."""
    from swarmtune.modelpaths import cache_root

    parser = argparse.ArgumentParser(prog="python -m swarmtune.tinymodel", description=main.__doc__)
    parser.add_argument("--out", type=Path, help="pretrain into this directory (default: install into the swarmtune cache)")
    parser.add_argument("--ship", action="store_true", help="with --out: copy the build into swarmtune/weights/")
    args = parser.parse_args(argv)
    if args.out is None:
        if args.ship:
            parser.error("--ship needs --out DIR: a fresh build to ship")
        directory = ensure_tiny(cache_root())
    elif args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; pass a new or empty directory")
    else:
        directory = build_tiny(args.out)
        if args.ship:
            ship(directory)
    manifest = read_manifest(directory)
    print(json.dumps({"path": str(directory), **{k: manifest[k] for k in ("content_hash", "held_out_accuracy", "pretraining")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
