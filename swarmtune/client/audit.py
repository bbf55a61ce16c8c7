"""The audit: chain, signatures and admissions; seeds and shaping checked against the job spec; optionally an exact replay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union, cast

from torch import nn

from swarmtune import entries, identity, ledger, shaping
from swarmtune.client.judging import Judging
from swarmtune.entries import Checkpoint, Genesis, Iteration, NoisePlan, Signed, StoredEntry
from swarmtune.fixedpoint import FixedPointOverflow
from swarmtune.jobspec import JobSpec, JobSpecError, parse_job_spec
from swarmtune.ledger import Problem
from swarmtune.noise import NOISE_VERSION
from swarmtune.replay import OnIteration, Replica, replica_from_genesis

# The job's base model, or what loads it (or its replica at iteration 0) from the verified genesis (only
# once the audit gets that far).
BaseModel = Union[nn.Module, Callable[[Genesis], Union[nn.Module, Replica]]]


@dataclass(frozen=True)
class AuditReport:
    """What an audit established, and the first entry that breaks the ledger if any."""

    job_id: str | None
    entries: int  # entries in the ledger
    sound: int  # leading entries that passed every check
    iterations: int  # iteration entries among the sound ones
    worker_signatures: int  # worker signatures the chain verification checked
    replayed: bool
    attestations_checked: int  # attested and checkpointed hashes compared with the replayed state
    final_state_hash: bytes | None  # the replayed state after the last sound iteration
    head_hash: bytes | None  # hash of the last sound entry
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        problem = self.problem
        return {
            "ok": self.ok,
            "job_id": self.job_id,
            "entries": self.entries,
            "sound_entries": self.sound,
            "iterations": self.iterations,
            "worker_signatures": self.worker_signatures,
            "replayed": self.replayed,
            "attestations_checked": self.attestations_checked,
            "final_state_hash": self.final_state_hash.hex() if self.final_state_hash else None,
            "head_hash": self.head_hash.hex() if self.head_hash else None,
            "first_bad_index": problem.index if problem else None,
            "kind": problem.kind if problem else None,
            "reason": problem.message if problem else None,
        }

    def describe(self) -> str:
        """The human report: verdict, what was checked, and where the ledger breaks."""
        sound = f"{self.sound} of {self.entries} entries ({self.iterations} iterations)"
        if self.problem is not None:
            lines = [f"audit FAILED: {self.problem.describe()}", f"  sound before it: {sound}"]
        else:
            lines = [f"audit OK: job {self.job_id}, {sound}"]
        lines.append(
            f"  checked: chain, coordinator signatures, {self.worker_signatures} worker signatures, admissions, "
            "member seeds, shaping (coefficients derived from the rewards), draws, verdicts, spot checks, strikes"
        )
        if self.replayed:
            lines.append(f"  replayed from the base model: {self.attestations_checked} attested or checkpointed hashes match")
            lines.append(f"  final state hash: {self.final_state_hash.hex() if self.final_state_hash else '-'}")
        else:
            lines.append("  not replayed: attestations and checkpoints unchecked (pass --model DIR --replay)")
        return "\n".join(lines)


def shaping_problem(body: Iteration, spec: JobSpec) -> str | None:
    """Why the entry's shaping method is not the job's (None if it is). Its coefficients are not
    recorded: the verified walk derived them from the signed rewards under the job spec (PROTOCOL §3)."""
    if body.shaping != spec.shaping:
        return f"shaped with {body.shaping!r}, the job spec says {spec.shaping!r}"
    return None


def plan_problem(body: Iteration, spec: JobSpec) -> str | None:
    """Why the recorded noise plan is not the job's (None if it is): members' seeds derive from it."""
    derived = NoisePlan(spec.job_seed, spec.population, spec.antithetic)
    if body.plan != derived:
        return f"noise plan {body.plan} recorded; the job spec gives {derived}"
    return None


def genesis_problem(genesis: Genesis) -> tuple[JobSpec | None, str | None]:
    """The job spec genesis records, or why this auditor cannot check the ledger against it."""
    if genesis.shaping_version != shaping.SHAPING_VERSION or genesis.noise_version != NOISE_VERSION:
        return None, (
            f"written for {genesis.shaping_version} and {genesis.noise_version}; this swarmtune implements "
            f"{shaping.SHAPING_VERSION} and {NOISE_VERSION}: audit with a matching swarmtune"
        )
    try:
        return parse_job_spec(genesis.job_spec), None
    except JobSpecError as exc:
        return None, f"the recorded job spec does not parse: {exc}"


def content_problem(entry: StoredEntry, spec: JobSpec | None) -> tuple[JobSpec | None, str | None]:
    """What the chain verification does not re-derive: the spec in genesis, the noise plan and the shaping method."""
    body = entry.entry.body
    if isinstance(body, Genesis):
        return genesis_problem(body)
    if isinstance(body, Iteration) and spec is not None:
        return spec, plan_problem(body, spec) or shaping_problem(body, spec)
    return spec, None


@dataclass(frozen=True)
class Checked:
    """The sound prefix of a ledger (every check but replay) and the first problem after it."""

    sound: list[StoredEntry]
    problem: Problem | None
    chain: ledger.Report


class ContentCheck:
    """Fed each entry the chain verification passed: re-derives its contents, and keeps the entries
    that hold up to the first that does not."""

    def __init__(self) -> None:
        self.spec: JobSpec | None = None
        self.sound: list[StoredEntry] = []
        self.problem: Problem | None = None
        self.judging = Judging()  # verdicts, spot checks and strikes re-derived (docs/SECURITY.md)

    def __call__(self, entry: StoredEntry) -> None:
        if self.problem is not None:
            return
        self.spec, problem = content_problem(entry, self.spec)
        if not problem and self.spec is not None:
            problem = self.judging.problem(entry.entry.body, self.spec)
        if problem:
            self.problem = Problem(entry.entry.index, entry.kind, problem)
        else:
            self.sound.append(entry)


def check_entries(stored: Sequence[bytes], coordinator_key: bytes | None = None) -> Checked:
    """Verify the chain (ledger.verify_chain, which derives the coefficients) and check the noise plan
    and shaping in the same walk: each entry parsed once. The chain is verified to its end (or first
    break) for the report's counts."""
    contents = ContentCheck()
    chain = ledger.verify_chain(stored, coordinator_key, on_entry=contents)
    return Checked(contents.sound, contents.problem or chain.problem, chain)


def claimed_hashes(body: entries.Body) -> list[tuple[str, int, bytes]]:
    """(who claims, iteration, state hash) an attestation or checkpoint entry asserts."""
    if isinstance(body, Signed):
        who = f"worker {identity.fingerprint(body.record.worker_key)}"
        return [(who, body.record.iteration, body.record.state_hash)]
    if isinstance(body, Checkpoint):
        return [("the checkpoint", body.iteration, body.state_hash)]
    return []


def attested_iterations(ledger_entries: Sequence[StoredEntry]) -> set[int]:
    """Iterations whose state hash some entry claims: the only ones replay must hash."""
    return {iteration for e in ledger_entries for _, iteration, _ in claimed_hashes(e.entry.body)}


@dataclass(frozen=True)
class Replayed:
    """What replaying a sound prefix found: the first hash claim it contradicts, and the state reached."""

    problem: Problem | None
    final_state_hash: bytes | None  # after the last iteration replayed (None if that one overflowed)
    checked: int


def replay_entries(
    base: nn.Module | Replica, sound: Sequence[StoredEntry], on_iteration: OnIteration | None = None
) -> Replayed:
    """Replay from the base model (loaded, or a replica at iteration 0 read from its files), comparing
    every attested and checkpointed hash on the way.

    Raises replay.ReplayError when `base` is not the job's base model.
    """
    genesis = cast(Genesis, sound[0].entry.body)  # a sound ledger starts with its genesis
    replica = base if isinstance(base, Replica) else replica_from_genesis(base, genesis)
    needed = attested_iterations(sound)
    hashes = {0: genesis.base_state_hash}
    total = sum(isinstance(e.entry.body, Iteration) for e in sound)
    checked = 0
    for entry in sound[1:]:
        body = entry.entry.body
        if isinstance(body, Iteration):
            try:
                replica.apply(body)
            except FixedPointOverflow as exc:
                return Replayed(Problem(entry.entry.index, entry.kind, f"replay overflows: {exc}"), None, checked)
            if body.iteration in needed:
                hashes[body.iteration] = replica.state_hash()
            if on_iteration:
                on_iteration(replica, total)
        for who, iteration, claimed in claimed_hashes(body):
            if claimed != hashes[iteration]:
                message = f"{who} says the state after iteration {iteration} hashes to {claimed.hex()}; replay gives {hashes[iteration].hex()}"
                return Replayed(Problem(entry.entry.index, entry.kind, message), replica.state_hash(), checked)
            checked += 1
    return Replayed(None, replica.state_hash(), checked)


def audit(
    stored: Sequence[bytes],
    model: BaseModel | None = None,
    on_iteration: OnIteration | None = None,
    coordinator_key: bytes | None = None,
) -> AuditReport:
    """Audit a ledger's stored entries (one walk: each entry parsed once); with the job's base `model`,
    also replay the sound ones exactly.

    The report names the first entry that fails any check (replay included). Raises
    replay.ReplayError when `model` is not the job's base model.
    """
    checked = check_entries(stored, coordinator_key)
    sound, problem = checked.sound, checked.problem
    replayed = None
    if model is not None and sound:
        base = model if isinstance(model, nn.Module) else model(cast(Genesis, sound[0].entry.body))
        replayed = replay_entries(base, sound, on_iteration)
        if replayed.problem is not None:
            # Replay only runs over the sound prefix, so its problem comes first.
            problem = replayed.problem
            sound = sound[: replayed.problem.index]
    return AuditReport(
        job_id=checked.chain.job_id,
        entries=len(stored),
        sound=len(sound),
        iterations=sum(isinstance(e.entry.body, Iteration) for e in sound),
        worker_signatures=checked.chain.worker_signatures,
        replayed=replayed is not None,
        attestations_checked=replayed.checked if replayed else 0,
        final_state_hash=replayed.final_state_hash if replayed else None,
        head_hash=sound[-1].hash if sound else None,
        problem=problem,
    )
