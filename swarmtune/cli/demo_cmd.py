"""`swarmtune demo`: the whole system on one machine: ES teaches builtin:tiny addition, then an audit with replay."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmtune.cli import CommandError, positive_int
from swarmtune.demo.job import DemoJob

if TYPE_CHECKING:
    from swarmtune.demo.cluster import Cluster
    from swarmtune.demo.follow import Follower
    from swarmtune.demo.progress import Display
    from swarmtune.demo.report import Summary
    from swarmtune.client.audit import AuditReport
    from swarmtune.client.status import JobStatus
    from swarmtune.jobspec import JobSpec

POLL_S = 0.5
START_TIMEOUT_S = 300.0  # the coordinator imports torch and loads the model before it listens
MAX_RECEIVE_BYTES = 64 << 20  # ledger entries carry every signed result of an iteration
TASK_LABEL = "two-digit addition (demo)"
PROBE_LABEL = "string reversal (demo-reverse)"
JOB_FILE = "job.toml"
LEDGER_FILE = "demo.ledger"
PLOT_FILE = "demo.png"


@dataclass(frozen=True)
class Prepared:
    """What the run needs before any process starts."""

    spec: JobSpec
    workdir: Path
    model_dir: Path
    coordinator_key: bytes  # public: the follower and the audit pin genesis to it
    build_seconds: float
    started: float  # time.monotonic() when the command started


def _even(text: str) -> int:
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (antithetic pairs), got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _step(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoJob()
    parser.add_argument(
        "--workdir", type=Path,
        help="keep the ledger (embedded Redis), keys, logs, ledger file and plot here; run again with the same "
        "directory and options to resume an interrupted demo (default: a new temporary directory, kept)",
    )  # fmt: skip
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes (default %(default)s)")
    parser.add_argument("--iterations", type=positive_int, default=defaults.iterations, help="ES iterations (default %(default)s)")
    parser.add_argument("--population", type=_even, default=defaults.population, help="members per iteration, even (default %(default)s)")
    parser.add_argument("--prompts", type=positive_int, default=defaults.prompts, help="training prompts per iteration (default %(default)s)")
    parser.add_argument(
        "--measure-every", type=positive_int, default=defaults.retention_every, metavar="N",
        help="iterations between held-out measurements of the center model: task accuracy and retention probe (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--alpha", type=_step, default=defaults.alpha,
        help="ES step size; 0.02 learns as fast but forgets the probe skill, the case --anchored-decay guards (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--anchored-decay", type=_fraction, default=defaults.anchored_decay, metavar="LAMBDA",
        help="retention guard: pull the weights this much toward the base model every iteration, e.g. 0.001 (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed, help="job seed: noise and prompt batches (default %(default)s)")
    parser.add_argument(
        "--job", type=Path, metavar="FILE",
        help="run this job spec on builtin:tiny instead of the demo's own (e.g. examples/eggroll.toml); it needs a "
        "[retention] task, the probe; --iterations, --population, --prompts, --alpha, --anchored-decay and --seed are then unused",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, help="PNG of the curves to write (default WORKDIR/demo.png)")
    parser.add_argument("--summary", type=Path, metavar="FILE", help="write the summary as one JSON object to FILE")
    parser.add_argument("--json", action="store_true", help="print the summary JSON on stdout instead of the report")


def demo_job(args: argparse.Namespace) -> DemoJob:
    return DemoJob(
        iterations=args.iterations,
        population=args.population,
        prompts=args.prompts,
        seed=args.seed,
        alpha=args.alpha,
        anchored_decay=args.anchored_decay,
        retention_every=args.measure_every,
    )


def job_text(path: Path) -> str:
    """A --job file's text, validated (the demo writes it to its work directory as given)."""
    from swarmtune.jobspec import JobSpecError, load_job_spec

    try:
        return load_job_spec(path).spec_bytes.decode()
    except JobSpecError as exc:
        raise CommandError(str(exc)) from None


def prepare_workdir(workdir: Path | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="swarmtune-demo-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create --workdir {workdir}: {exc.strerror}; pass a writable directory") from None
    return workdir.resolve()


def write_job_file(path: Path, text: str) -> None:
    """The job spec in the work directory; one that differs means the directory holds another demo's ledger."""
    if path.exists() and path.read_text() != text:
        raise CommandError(
            f"{path.parent} holds a demo run with other options (see {path}); rerun with those options to "
            "resume it, or pass a new --workdir"
        )
    path.write_text(text)


def build_model(spec: JobSpec, display: Display) -> tuple[Path, float]:
    """The base model's directory, and the seconds spent installing it (builtin:tiny, first use only)."""
    from swarmtune.modelpaths import cache_root
    from swarmtune.models import ModelResolutionError, resolve_model
    from swarmtune.tinymodel import MANIFEST, tiny_dir

    building = not (tiny_dir(cache_root()) / MANIFEST).is_file()
    if building:
        display.note("installing builtin:tiny into the cache (first run only) ...")
    started = time.monotonic()
    try:
        model_dir = resolve_model(spec.model)
    except ModelResolutionError as exc:
        raise CommandError(str(exc)) from None
    return model_dir, (time.monotonic() - started if building else 0.0)


def wait_ready(stub: Any, cluster: Cluster, spec: JobSpec) -> JobStatus:
    """The first status the coordinator answers with; CommandError if it stops or never listens."""
    import grpc

    from swarmtune.demo.progress import fetch_status

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        failure = cluster.failure()
        if failure:
            raise CommandError(failure)
        try:
            return fetch_status(stub, spec)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise CommandError(
                    f"the coordinator did not answer on {cluster.address} within {START_TIMEOUT_S:.0f} s; "
                    f"see {cluster.coordinator.log}"
                ) from None
        time.sleep(POLL_S)


def follow_job(cluster: Cluster, prepared: Prepared, every: int, display: Display) -> Follower:
    """Show live progress until the job finishes, replaying the ledger as it grows."""
    import grpc

    from swarmtune.demo.follow import Follower, fetch_entries
    from swarmtune.demo.progress import fetch_status, progress_line
    from swarmtune.wire.service_pb2_grpc import CoordinatorStub

    spec = prepared.spec
    with grpc.insecure_channel(cluster.address, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]) as channel:
        stub = CoordinatorStub(channel)
        status = wait_ready(stub, cluster, spec)
        stored = fetch_entries(stub, 0)
        follower = Follower(stored[0], prepared.coordinator_key, prepared.model_dir, spec, every)
        follower.accept_all(stored[1:])
        while True:
            finished = status.state == "finished"
            display.show(progress_line(status, follower.latest, time.monotonic() - prepared.started), final=finished)
            if finished:
                display.end()
                return follower
            time.sleep(POLL_S)
            failure = cluster.failure()
            if failure:
                raise CommandError(failure)
            try:
                status = fetch_status(stub, spec)
                follower.accept_all(fetch_entries(stub, follower.next_index))
            except grpc.RpcError:
                continue  # a busy coordinator; a stopped one is caught by cluster.failure()


def prepare(args: argparse.Namespace, display: Display, started: float) -> Prepared:
    """The job spec written to the work directory, the base model built, the coordinator's key."""
    from swarmtune.demo.cluster import ensure_key
    from swarmtune.jobspec import parse_job_spec

    text = job_text(args.job) if args.job else demo_job(args).toml()
    spec = parse_job_spec(text.encode())
    if not spec.retention_task:
        raise CommandError(f"{args.job} has no [retention] task; the demo measures its probe: add [retention] task and every")
    workdir = prepare_workdir(args.workdir)
    write_job_file(workdir / JOB_FILE, text)
    model_dir, build_seconds = build_model(spec, display)
    return Prepared(spec, workdir, model_dir, ensure_key(workdir / "coordinator.key"), build_seconds, started)


def train(args: argparse.Namespace, prepared: Prepared, display: Display) -> Follower:
    """Run the job on a coordinator and workers; every one of them is stopped on the way out, Ctrl-C included."""
    from swarmtune.demo.cluster import running_cluster

    spec, workdir = prepared.spec, prepared.workdir
    display.note(f"swarmtune demo: {args.workers} workers, population {spec.population}, {spec.iterations} iterations; logs in {workdir}")
    try:
        with running_cluster(workdir, workdir / JOB_FILE, args.workers, spec.population) as cluster:
            return follow_job(cluster, prepared, args.measure_every, display)
    except KeyboardInterrupt:
        display.note(
            f"stopped every process; the ledger in {workdir / 'redis'} is intact: "
            f"`swarmtune demo --workdir {workdir}` with the same options resumes it"
        )
        raise


def audit_problem(report: AuditReport, follower: Follower) -> str | None:
    """Why the run does not check out: the audit's first problem, or two replicas that disagree."""
    if report.problem is not None:
        return report.problem.describe()
    if report.final_state_hash != follower.replica.state_hash():
        return "the audit's replay and the demo's own replica reached different states; report this as a bug"
    return None


def conclude(args: argparse.Namespace, prepared: Prepared, follower: Follower) -> Summary:
    """Export the ledger, audit it with replay, plot the curves, and sum it all up."""
    from swarmtune.demo.report import Summary, audit_ledger, export_ledger, read_ledger, save_plot

    workdir = prepared.workdir
    stored = read_ledger(workdir / "redis", prepared.spec.job_id)
    follower.accept_all(stored[follower.next_index :])
    follower.finish()
    plot = args.plot or workdir / PLOT_FILE
    try:
        export_ledger(stored, workdir / LEDGER_FILE)
        save_plot(stored, follower.measurements, plot)
    except OSError as exc:
        raise CommandError(f"cannot write {exc.filename or plot}: {exc.strerror}; pass a writable --plot path") from None
    report = audit_ledger(stored, prepared.model_dir, prepared.coordinator_key)
    problem = audit_problem(report, follower)
    before, after = follower.measurements[0], follower.latest
    return Summary(
        job_id=prepared.spec.job_id,
        iterations=follower.iteration,
        workers=args.workers,
        population=prepared.spec.population,
        task_accuracy_before=before.task_accuracy,
        task_accuracy_after=after.task_accuracy,
        retention_before=before.probe_accuracy,
        retention_after=after.probe_accuracy,
        audit_ok=problem is None,
        audit_problem=problem,
        final_state_hash=report.final_state_hash.hex() if report.final_state_hash else None,
        wall_seconds=round(time.monotonic() - prepared.started, 1),
        build_seconds=round(prepared.build_seconds, 1),
        curve=tuple(follower.measurements),
        ledger=str(workdir / LEDGER_FILE),
        plot=str(plot),
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    import torch
    from transformers.utils import logging as hf_logging

    from swarmtune.demo.progress import Display
    from swarmtune.demo.report import describe
    from swarmtune.ledger import LedgerError
    from swarmtune.replay import ReplayError
    from swarmtune.store import StoreError

    # The demo's replica measures while the workers evaluate: it must not take their cores.
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    display = Display(sys.stderr)
    prepared = prepare(args, display, started)
    try:
        summary = conclude(args, prepared, train(args, prepared, display))
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    except (LedgerError, ReplayError) as exc:
        # The demo's own coordinator wrote this ledger: a failure here is a bug in swarmtune.
        raise CommandError(f"{exc}; please report this with the logs in {prepared.workdir}") from None
    if args.summary:
        try:
            args.summary.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
        except OSError as exc:
            raise CommandError(f"cannot write --summary {args.summary}: {exc.strerror}; pass a writable path") from None
    print(json.dumps(summary.to_json()) if args.json else describe(summary, TASK_LABEL, PROBE_LABEL))
    return 0 if summary.audit_ok else 1
