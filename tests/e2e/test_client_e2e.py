"""The client on a real ledger: a coordinator and 2 workers train a tiny model, then audit, export, plot, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import batches, entries, identity, ledger, ledgerfile
from swarmtune.client import audit as client_audit
from swarmtune.client.status import JobStatus, StatusError, fetch_status
from swarmtune.demo.cluster import child_env
from swarmtune.entries import Attestation, Checkpoint, Iteration, Revocation, Signed, StoredEntry
from tests.support.cli_runner import run_cli
from tests.support.cluster import Cluster, attested_by_logs, spec_text
from tests.support.processes import ROOT, Proc
from tests.support.specs import Table

pytestmark = pytest.mark.slow

ITERATIONS = 4
EXPORT_AT = 2
PROMPT = "3+4="
# Low-rank matrices and dense others: both exact update paths, and anchored decay (in spec_text).
NOISE: Table = {"family": "lowrank", "rank": 1, "lowrank_others": "dense"}


@dataclass(frozen=True)
class Run:
    """The finished job: its cluster (coordinator still serving), ledger, logs and live statuses seen."""

    cluster: Cluster
    model_dir: Path
    ledger: Path
    stored: list[bytes]
    workers: list[Proc]
    live: list[JobStatus]

    @property
    def parsed(self) -> list[StoredEntry]:
        return [entries.parse_entry(s) for s in self.stored]

    def coordinator_key(self) -> Ed25519PrivateKey:
        return identity.load_private_key(self.cluster.coordinator_key)

    def worker_key(self, public: bytes) -> Ed25519PrivateKey:
        keys = [identity.load_private_key(path) for path in self.cluster.worker_keys]
        return next(key for key in keys if identity.public_key_bytes(key) == public)

    def index_of(self, what: Callable[[StoredEntry], bool]) -> int:
        return next(e.entry.index for e in self.parsed if what(e))


def _poll_until(cluster: Cluster, coordinator: Proc, done: Callable[[JobStatus], bool], timeout_s: float = 180.0) -> list[JobStatus]:
    """Live statuses through the client API until one satisfies `done`."""
    seen: list[JobStatus] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert coordinator.popen.poll() is None, coordinator.tail()
        try:
            seen.append(fetch_status(cluster.address, timeout_s=5.0))
        except StatusError:
            pass  # not listening yet
        if seen and done(seen[-1]):
            return seen
        time.sleep(0.1)
    pytest.fail(f"the job's status did not get there in {timeout_s}s:\n{coordinator.tail()}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, redis_url: str, model_dir: Path) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("client-job")
    spec = spec_text(f"client-{uuid.uuid4().hex[:8]}", model_dir, iterations=ITERATIONS, retention_every=2, noise=NOISE)
    cluster = Cluster(root=root / "cluster", redis_url=redis_url, model_dir=model_dir, spec=spec)
    try:
        coordinator = cluster.coordinator("--serve-after", "--min-workers", "2")
        first = cluster.worker(0)
        live = _poll_until(cluster, coordinator, lambda s: s.workers_online == 1)  # --min-workers holds iteration 1
        # Paused, the first worker holds iteration 1 open (its members are not due elsewhere for 30 s)
        # while the second joins: the live status must show both online. Paused only once the second
        # has loaded and built genesis, for its join alone: a worker stopped for longer (a slow start
        # on a loaded machine) misses its connection's pings and is dropped after 10 s, and would
        # then never show online while stopped.
        second = cluster.worker(1)
        second.wait_for("genesis", 120)
        first.popen.send_signal(signal.SIGSTOP)
        try:
            live += _poll_until(cluster, coordinator, lambda s: s.workers_online == 2)
        finally:
            first.popen.send_signal(signal.SIGCONT)
        workers = [first, second]
        live += _poll_until(cluster, coordinator, lambda s: s.state == "finished")
        for worker in workers:
            assert worker.wait(60) == 0, worker.tail()
        path = cluster.export()
        yield Run(cluster, model_dir, path, ledgerfile.read(path), workers, live)
    finally:
        cluster.close()


# ---- tampering ---------------------------------------------------------------------------------


def reseal(run: Run, entry: entries.Entry) -> bytes:
    """Sealed with the real coordinator key: only the check aimed at the change can catch it."""
    return entries.seal(run.coordinator_key(), entry)


def with_body(run: Run, index: int, body: entries.Body) -> list[bytes]:
    stored = list(run.stored)
    stored[index] = reseal(run, replace(run.parsed[index].entry, body=body))
    return stored


def reward_resigned_by_wrong_key(run: Run) -> tuple[list[bytes], int, str]:
    target = run.index_of(lambda e: isinstance(e.entry.body, Iteration))
    body: Iteration = run.parsed[target].entry.body  # type: ignore[assignment]
    original = body.batches[0]
    # The forged batch still names the original worker; its signature is another key's.
    b = original.batch
    raised = batches.pack_rewards([r + 0.5 for r in b.rewards])
    payload = batches.payload(b.job_id, b.iteration, b.head_hash, b.worker_key, b.packed_members, raised)
    signature = identity.sign(identity.generate_key(), identity.CONTEXT_BATCH, payload)
    forged = replace(original, batch=batches.parts(b.job_id, b.iteration, b.head_hash, b.worker_key, b.packed_members, raised, signature))
    return with_body(run, target, replace(body, batches=(forged, *body.batches[1:]))), target, "worker signature invalid"


def shaping_changed(run: Run) -> tuple[list[bytes], int, str]:
    # An entry records no coefficients (the walk derives them under the job spec); what it says of
    # its shaping the audit checks against the job spec.
    target = run.index_of(lambda e: isinstance(e.entry.body, Iteration) and e.entry.body.iteration == 2)
    body: Iteration = run.parsed[target].entry.body  # type: ignore[assignment]
    return with_body(run, target, replace(body, shaping="centered_rank")), target, "the job spec says"


def entry_removed(run: Run) -> tuple[list[bytes], int, str]:
    target = run.index_of(lambda e: isinstance(e.entry.body, Iteration) and e.entry.body.iteration == 2)
    return run.stored[:target] + run.stored[target + 1 :], target, "an entry is missing, repeated or moved"


def entries_swapped(run: Run) -> tuple[list[bytes], int, str]:
    target = run.index_of(lambda e: isinstance(e.entry.body, Iteration) and e.entry.body.iteration == 2)
    stored = list(run.stored)
    stored[target], stored[target + 1] = stored[target + 1], stored[target]
    return stored, target, "an entry is missing, repeated or moved"


def result_from_revoked_key(run: Run) -> tuple[list[bytes], int, str]:
    """A valid revocation of a worker, sealed just before an iteration that counts its results."""
    position = run.index_of(lambda e: isinstance(e.entry.body, Iteration) and e.entry.body.iteration == 2)
    target = run.parsed[position]
    previous = run.parsed[position - 1]
    revoked = target.entry.body.batches[0].batch.worker_key  # type: ignore[union-attr]
    revocation = reseal(run, entries.next_entry(previous, Revocation(revoked, "test: key leaked", ""), 1))
    moved = replace(target.entry, index=position + 1, prev_hash=entries.entry_hash(revocation))
    stored = [*run.stored[:position], revocation, reseal(run, moved), *run.stored[position + 1 :]]
    return stored, position + 1, "was revoked"


def attestation_with_wrong_hash(run: Run) -> tuple[list[bytes], int, str]:
    target = run.index_of(lambda e: isinstance(e.entry.body, Signed))
    body: Signed[Attestation] = run.parsed[target].entry.body  # type: ignore[assignment]
    wrong = replace(body.record, state_hash=bytes(32))
    return with_body(run, target, entries.sign_record(run.worker_key(wrong.worker_key), wrong)), target, "replay gives"


TAMPERINGS = {
    "reward re-signed by a wrong key": reward_resigned_by_wrong_key,
    "shaping changed": shaping_changed,
    "entry removed": entry_removed,
    "entries swapped": entries_swapped,
    "result from a revoked key": result_from_revoked_key,
    "attestation with a wrong hash": attestation_with_wrong_hash,
}


@pytest.fixture(scope="module")
def base_model(run: Run) -> torch.nn.Module:
    from swarmtune.models import load_model

    return load_model(run.model_dir)[0]


@pytest.fixture(scope="module")
def sound_report(run: Run, base_model: torch.nn.Module) -> client_audit.AuditReport:
    return client_audit.audit(run.stored, base_model)


def test_audit_passes_on_the_real_ledger(run: Run, sound_report: client_audit.AuditReport) -> None:
    assert sound_report.ok, sound_report.describe()
    assert sound_report.entries == len(run.stored) and sound_report.iterations == ITERATIONS
    assert sound_report.attestations_checked == sum(isinstance(e.entry.body, Signed) for e in run.parsed) > 0
    bodies = [e.entry.body for e in run.parsed]
    signed = sum(len(b.batches) + len(b.retention) if isinstance(b, Iteration) else len(b.attestations) if isinstance(b, Checkpoint) else isinstance(b, Signed) for b in bodies)
    # One signature per batch: how many members a batch holds depends on when each was evaluated (a
    # loaded machine may send every member alone), so the count is checked against the batches.
    assert sound_report.worker_signatures == signed


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_each_tampering_fails_the_audit_at_its_entry(
    run: Run, base_model: torch.nn.Module, tamper: Callable[[Run], tuple[list[bytes], int, str]]
) -> None:
    stored, index, reason = tamper(run)
    report = client_audit.audit(stored, base_model)
    assert not report.ok
    assert report.problem is not None
    assert (report.problem.index, reason in report.problem.message) == (index, True), report.describe()
    assert report.to_json()["first_bad_index"] == index and reason in report.to_json()["reason"]


def test_only_the_audit_catches_a_resealed_shaping_method(run: Run) -> None:
    stored, index, _ = shaping_changed(run)
    chain = ledger.verify_chain(stored)
    assert chain.problem is not None and chain.problem.index == index + 1  # the chain itself holds at `index`


def test_checkpoints_are_checked_against_the_replayed_state(
    run: Run, base_model: torch.nn.Module, sound_report: client_audit.AuditReport
) -> None:
    last = run.parsed[-1]
    final = sound_report.final_state_hash
    assert final is not None

    def checkpoint(state_hash: bytes) -> list[bytes]:
        keys = [identity.load_private_key(path) for path in run.cluster.worker_keys[:2]]
        attestations = tuple(
            entries.sign_record(key, Attestation(last.entry.job_id, ITERATIONS, state_hash, identity.public_key_bytes(key))) for key in keys
        )
        body = Checkpoint(ITERATIONS, state_hash, attestations, 2)
        return [*run.stored, reseal(run, entries.next_entry(last, body, 1))]

    good = client_audit.audit(checkpoint(final), base_model)
    assert good.ok and good.attestations_checked == sound_report.attestations_checked + 1
    bad = client_audit.audit(checkpoint(bytes(32)), base_model)
    assert bad.problem is not None and (bad.problem.index, bad.problem.kind) == (len(run.stored), "checkpoint")


def test_audit_cli_exit_codes_and_json(run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(monkeypatch, "audit", "--ledger", str(run.ledger)) == 0
    assert "audit OK" in capsys.readouterr().out
    bad = tmp_path / "bad.bin"
    stored, index, _ = shaping_changed(run)
    ledgerfile.write(bad, stored)
    assert run_cli(monkeypatch, "audit", "--ledger", str(bad), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["first_bad_index"]) == (False, index) and "the job spec says" in report["reason"]
    job = run.parsed[0].entry.job_id
    assert run_cli(monkeypatch, "audit", "--redis-url", run.cluster.redis_url, "--job", job, "--json") == 0
    assert json.loads(capsys.readouterr().out)["entries"] >= len(run.stored)


def test_replay_audit_under_default_capability_reproduces_the_attested_hash(run: Run) -> None:
    env = {**child_env(), "ATEN_CPU_CAPABILITY": "default"}
    argv = [sys.executable, "-m", "swarmtune", "audit", "--ledger", str(run.ledger), "--replay", "--model", str(run.model_dir), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    attested = [attested_by_logs(worker) for worker in run.workers]
    assert {hashes[ITERATIONS] for hashes in attested} == {report["final_state_hash"]}
    assert report["ok"] and report["replayed"] and report["attestations_checked"] > 0


# ---- export ------------------------------------------------------------------------------------


def center_output(run: Run, iteration: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """What a worker's backend generates for the center model at `iteration`, and its weights."""
    from swarmtune.backends.hf import HFBackend
    from swarmtune.models import load_model
    from swarmtune.replay import genesis_spec, replay

    verified = [entry for _, entry in ledger.walk(run.stored)]
    model, tokenizer = load_model(run.model_dir)
    result = replay(model, verified, iteration)
    spec = genesis_spec(verified[0].entry.body)  # type: ignore[arg-type]
    evaluator = HFBackend(model, tokenizer, result.replica.state, spec.noise, spec.sigma, "cpu")
    return evaluator.generate([PROMPT], 8), {name: p.detach().clone() for name, p in model.named_parameters()}


def test_export_reloads_and_generates_what_workers_evaluated(
    run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    argv = ["export", "--ledger", str(run.ledger), "--model", str(run.model_dir), "--iteration", str(EXPORT_AT), "--out", str(out), "--json"]
    assert run_cli(monkeypatch, *argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iteration"] == EXPORT_AT and summary["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected, weights = center_output(run, EXPORT_AT)
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
    encoded = tokenizer([PROMPT], return_tensors="pt")
    tokens = model.generate(**encoded, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(tokens[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert completion == expected[0]
    assert summary["state_hash"] in {h[EXPORT_AT] for h in map(attested_by_logs, run.workers)}


def test_export_refuses_a_used_directory_and_an_unknown_iteration(run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    common = ["export", "--ledger", str(run.ledger), "--model", str(run.model_dir)]
    assert run_cli(monkeypatch, *common, "--out", str(tmp_path / "used")) == 2
    assert run_cli(monkeypatch, *common, "--iteration", str(ITERATIONS + 1), "--out", str(tmp_path / "new")) == 2


# ---- plot and status ---------------------------------------------------------------------------


def test_plot_renders_a_png_of_the_real_ledger(run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from PIL import Image

    from swarmtune.client.plot import DPI, HEIGHT_IN, WIDTH_IN

    out = tmp_path / "curves.png"
    assert run_cli(monkeypatch, "plot", "--ledger", str(run.ledger), "--out", str(out)) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
        gray = np.asarray(image.convert("L"), dtype=np.float64)
    assert gray.std() > 20, "the plot is (nearly) blank"


def test_live_status_saw_workers_progress_and_timing(run: Run) -> None:
    final = run.live[-1]
    assert (final.state, final.closed, final.progress) == ("finished", ITERATIONS, 1.0)
    assert max(s.workers_online or 0 for s in run.live) == 2
    assert all(w.accepted > 0 for w in final.workers)
    timed = [s for s in final.recent if s.evaluation_s is not None]
    assert timed and all(s.overhead_s is not None and s.evaluation_s >= 0 for s in timed)
    assert [s.iteration for s in final.recent] == list(range(1, ITERATIONS + 1))
    assert any(s.retention for s in final.recent)


def test_status_cli_from_the_coordinator_and_from_redis(run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, "status", "--coordinator", run.cluster.address, "--json") == 0
    live = json.loads(capsys.readouterr().out)
    assert live["source"] == "coordinator" and live["progress"] == 1.0 and len(live["workers"]) == 2
    assert run_cli(monkeypatch, "status", "--coordinator", run.cluster.address, "--watch") == 0  # returns: finished
    assert "100%" in capsys.readouterr().out
    job = run.parsed[0].entry.job_id
    assert run_cli(monkeypatch, "status", "--redis-url", run.cluster.redis_url, "--job", job) == 0
    text = capsys.readouterr().out
    assert "100%" in text and f"{ITERATIONS}/{ITERATIONS} iterations closed" in text and "retention: letters" in text


def test_status_names_an_unreachable_coordinator(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, "status", "--coordinator", "127.0.0.1:1") == 2
    assert "check the address" in capsys.readouterr().err
