"""The demo's own replica: it verifies and replays the ledger as it grows and measures the center model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, cast

from swarmtune import ledger
from swarmtune.backends.registry import backend_factory
from swarmtune.entries import Genesis, Iteration
from swarmtune.follower import LedgerFollower
from swarmtune.jobspec import JobSpec
from swarmtune.models import load_model
from swarmtune.replay import Replica, replica_from_genesis
from swarmtune.tasks.base import Task, columns_of
from swarmtune.tasks.demo import exact_match
from swarmtune.tasks.registry import load_task

FETCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Measurement:
    """Held-out exact-match accuracy of the center model after `iteration` iterations (0: the base model)."""

    iteration: int
    task_accuracy: float
    probe_accuracy: float


class Follower:
    """Replays a job's ledger entry by entry, each verified against the chain first (as a worker does),
    and measures the center model on both held-out sets every `every` iterations."""

    def __init__(self, genesis: bytes, coordinator_key: bytes, model_dir: Path, spec: JobSpec, every: int) -> None:
        chain, entry = ledger.start(genesis, coordinator_key)
        model, tokenizer = load_model(model_dir)
        replica = replica_from_genesis(model, cast(Genesis, entry.entry.body))  # start() checked the kind
        self.ledger_follower = LedgerFollower(chain, replica)
        self.evaluator = backend_factory("hf")(model, tokenizer, self.replica.state, spec, "cpu", None)  # greedy only: no noise to keep
        self.spec = spec
        self.every = every
        self.task = load_task(spec.task, tokenizer=tokenizer, **spec.task_options)
        self.probe = load_task(spec.retention_task, tokenizer=tokenizer, **spec.retention_options)
        self.measurements = [self.measure()]

    @property
    def replica(self) -> Replica:
        return self.ledger_follower.replica

    @property
    def next_index(self) -> int:
        return self.ledger_follower.next_index

    @property
    def iteration(self) -> int:
        return self.replica.iteration

    @property
    def latest(self) -> Measurement:
        return self.measurements[-1]

    def accept_all(self, stored_entries: Iterable[bytes]) -> None:
        """Verify and apply the entries in order, measuring whenever a measurement is due."""
        for entry in self.ledger_follower.follow(stored_entries):
            if isinstance(entry.entry.body, Iteration) and self.iteration % self.every == 0:
                self.measurements.append(self.measure())

    def finish(self) -> None:
        """Measure the final center model if the last measurement was earlier."""
        if self.latest.iteration != self.iteration:
            self.measurements.append(self.measure())

    def measure(self) -> Measurement:
        self.evaluator.set_center(self.replica.state)
        return Measurement(self.iteration, self.accuracy(self.task), self.accuracy(self.probe))

    def accuracy(self, task: Task) -> float:
        """Exact-match accuracy of the center's greedy completions on the task's held-out split."""
        examples = task.held_out()
        prompts = [example.prompt for example in examples]
        completions = self.evaluator.generate(prompts, self.spec.max_new_tokens)
        scores = exact_match(prompts, completions, **columns_of(examples))
        return sum(scores) / len(scores)


def fetch_entries(stub: Any, from_index: int) -> Sequence[bytes]:
    """Stored entry bytes from `from_index` to the coordinator's head (its FetchLedger RPC)."""
    from swarmtune.wire import service_pb2 as pb

    request = pb.FetchLedgerRequest(from_index=from_index, to_index=0)
    return [item.stored for item in stub.FetchLedger(request, timeout=FETCH_TIMEOUT_S)]
