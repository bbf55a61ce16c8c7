"""`swarmtune status`: a job at a glance, live from its coordinator or from its ledger in Redis."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from swarmtune.cli import CommandError, source_required

if TYPE_CHECKING:
    from swarmtune.client.status import IterationSummary, JobStatus, WorkerSummary

BAR_WIDTH = 30
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=source_required())
    where.add_argument("--coordinator", metavar="HOST:PORT", help="ask the coordinator (live: workers, rejects, timings)")
    where.add_argument("--redis-url", help="read the job's ledger from Redis instead (redis://..., rediss://..., unix:///path; default: $SWARMTUNE_REDIS_URL)")
    parser.add_argument("--job", help="job id in --redis-url (may be left out when the database holds one job)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to verify the coordinator over TLS")
    parser.add_argument("--watch", action="store_true", help="refresh until the job finishes (Ctrl-C to stop)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (one per refresh with --watch)")


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """A text progress bar: [#####.....]  50%  5/10 iterations closed."""
    share = min(1.0, done / total) if total else 0.0
    filled = round(share * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%}  {done}/{total} iterations closed"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def _reward_line(last: IterationSummary) -> str:
    line = (
        f"reward, iteration {last.iteration}: population mean {_number(last.reward_mean)}, max {_number(last.reward_max)} "
        f"(min {_number(last.reward_min)}; {last.rewarded}/{last.members} rewarded)"
    )
    return line if last.center_reward is None else f"{line}; center {_number(last.center_reward)}"


def _retention_line(recent: tuple[IterationSummary, ...]) -> str:
    first: dict[str, tuple[int, float]] = {}
    latest: dict[str, tuple[int, float]] = {}
    for summary in recent:
        for name, value in summary.retention.items():
            first.setdefault(name, (summary.iteration, value))
            latest[name] = (summary.iteration, value)
    if not latest:
        return "retention: not measured"
    parts = [
        f"{name} {value:.3f} at iteration {at} (first {first[name][1]:.3f} at iteration {first[name][0]})"
        for name, (at, value) in latest.items()
    ]
    return "retention: " + "; ".join(parts)


def _timing_line(recent: tuple[IterationSummary, ...]) -> str:
    timed = [s for s in recent if s.wall_s is not None]
    if not timed:
        return "iteration time: -"
    last = timed[-1]
    mean_wall = sum(s.wall_s or 0.0 for s in timed) / len(timed)
    line = f"iteration time: {last.wall_s:.2f} s last, {mean_wall:.2f} s mean of {len(timed)}"
    split = [s for s in timed if s.evaluation_s is not None and s.overhead_s is not None]
    if not split:
        return line + " (between closes: the ledger does not split evaluation from overhead; ask --coordinator)"
    evaluation = sum(s.evaluation_s or 0.0 for s in split)
    overhead = sum(s.overhead_s or 0.0 for s in split)
    share = overhead / (evaluation + overhead) if evaluation + overhead else 0.0
    return f"{line}; evaluation {evaluation / len(split):.2f} s + overhead {overhead / len(split):.3f} s ({share:.1%} overhead)"


def _worker_line(worker: WorkerSummary) -> str:
    state = "revoked" if worker.revoked else {True: "online", False: "offline", None: "seen"}[worker.connected]
    parts = [f"  {worker.worker_id}  {state:<7}", f"{worker.accepted} accepted"]
    if worker.capacity is not None:
        parts.append(f"capacity {worker.capacity}")
    if worker.results_per_s is not None:
        parts.append(f"{worker.results_per_s:.2f} results/s")
    if worker.rejected is not None:
        parts.append(f"{worker.rejected} rejected" + (f" ({_counts(worker.rejects)})" if worker.rejects else ""))
    if worker.strikes:
        parts.append(f"{worker.strikes} strikes")
    return "  ".join(parts)


def render(status: JobStatus, where: str) -> str:
    """The human status: header, progress bar, rewards, retention, timing, workers, rejects, alerts."""
    lines = [
        f"job {status.job_id}: {status.state}, iteration {status.iteration} of {status.iterations_total} ({where})",
        bar(status.closed, status.iterations_total),
    ]
    if status.settled is not None and status.state in ("running", "waiting"):
        lines.append(f"open iteration {status.closed + 1}: {status.settled}/{status.population} members settled")
    if status.recent:
        lines += [_reward_line(status.recent[-1]), _retention_line(status.recent), _timing_line(status.recent)]
    online = status.workers_online
    count = f"{online} online of {len(status.workers)}" if online is not None else f"{len(status.workers)} in the ledger"
    lines.append(f"workers: {count}")
    lines += [_worker_line(worker) for worker in status.workers]
    if status.source == "coordinator":
        lines.append(f"rejects: {_counts(status.rejects) or 'none'}")
    lines.append("alerts: " + ("; ".join(status.alerts) if status.alerts else "none"))
    return "\n".join(lines)


def _fetcher(args: argparse.Namespace) -> Callable[[], JobStatus]:
    from swarmtune.client.source import LedgerSource, SourceError, read_stored
    from swarmtune.client.status import StatusError, fetch_status, ledger_status
    from swarmtune.entries import EntryError, parse_entry
    from swarmtune.jobspec import JobSpecError

    def from_coordinator() -> JobStatus:
        try:
            return fetch_status(args.coordinator, args.tls_ca)
        except (StatusError, JobSpecError, EntryError, ValueError) as exc:
            raise CommandError(str(exc)) from None

    def from_ledger() -> JobStatus:
        try:
            # Status shows, audit verifies: parsing is enough here.
            return ledger_status([parse_entry(s) for s in read_stored(LedgerSource(None, args.redis_url, args.job))])
        except (SourceError, JobSpecError, EntryError, ValueError) as exc:
            raise CommandError(str(exc)) from None

    return from_coordinator if args.coordinator else from_ledger


def run(args: argparse.Namespace) -> int:
    if args.job and not args.redis_url:
        raise CommandError("--job selects a job in --redis-url; the coordinator runs one job")
    if args.interval <= 0:
        raise CommandError("--interval must be a positive number of seconds")
    fetch = _fetcher(args)
    where = f"live from {args.coordinator}" if args.coordinator else "from the ledger"
    clear = args.watch and not args.json and sys.stdout.isatty()
    while True:
        status = fetch()
        text = json.dumps(status.to_json()) if args.json else render(status, where)
        print(CLEAR_SCREEN + text if clear else text, flush=True)
        if not args.watch or status.state == "finished":
            return 0
        time.sleep(args.interval)
        if not args.json and not clear:
            print(flush=True)
