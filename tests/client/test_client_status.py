"""The status record and its human rendering: progress bar, rewards, retention, timing split, workers."""

from __future__ import annotations

import json
from types import MappingProxyType

from swarmtune.cli.status_cmd import bar, render
from swarmtune.client.status import IterationSummary, JobStatus, WorkerSummary


def summary(t: int, timed: bool = True, retention: float | None = None, center: float | None = None) -> IterationSummary:
    return IterationSummary(
        iteration=t, members=8, rewarded=8, reward_mean=0.25 + 0.01 * t, reward_min=0.0, reward_max=0.5, center_reward=center,
        retention=MappingProxyType({} if retention is None else {"reversal": retention}), alerts=(),
        evaluation_s=1.9 if timed else None, overhead_s=0.1 if timed else None, wall_s=2.0,
    )  # fmt: skip


def status(**changes: object) -> JobStatus:
    fields: dict[str, object] = dict(
        source="coordinator", job_id="demo", state="running", iteration=4, iterations_total=10, closed=3, population=8,
        settled=5, head_index=7, head_hash=bytes(32),
        recent=(summary(1, retention=0.97), summary(2), summary(3, retention=0.91, center=0.4)),
        workers=(
            WorkerSummary("aaaa", 20, False, "op-a", 4, True, 1, 0.5, 0, MappingProxyType({"WRONG_HEAD": 1})),
            WorkerSummary("bbbb", 4, False, "op-b", 4, False, 0, 0.0, 0),
        ),
        rejects=MappingProxyType({"WRONG_HEAD": 1}), alerts=(),
    )  # fmt: skip
    fields.update(changes)
    return JobStatus(**fields)  # type: ignore[arg-type]


def test_bar_fills_in_proportion() -> None:
    assert bar(3, 10, width=10) == "[###.......]  30%  3/10 iterations closed"
    assert bar(0, 0, width=4) == "[....]   0%  0/0 iterations closed"


def test_render_shows_the_operator_everything_at_a_glance() -> None:
    text = render(status(), "live")
    assert "job demo: running, iteration 4 of 10 (live)" in text
    assert " 30%  3/10 iterations closed" in text and "open iteration 4: 5/8 members settled" in text
    assert "population mean 0.280, max 0.500" in text and "center 0.400" in text
    assert "reversal 0.910 at iteration 3 (first 0.970 at iteration 1)" in text
    assert "evaluation 1.90 s + overhead 0.100 s (5.0% overhead)" in text
    assert "workers: 1 online of 2" in text and "WRONG_HEAD 1" in text and "0.50 results/s" in text


def test_render_from_the_ledger_says_what_it_cannot_know() -> None:
    ledger_workers = (WorkerSummary("aaaa", 20, False), WorkerSummary("cccc", 2, True))
    text = render(status(source="ledger", settled=None, recent=(summary(1, timed=False),), workers=ledger_workers), "from the ledger")
    assert "does not split evaluation from overhead" in text
    assert "workers: 2 in the ledger" in text and "cccc  revoked" in text and "rejects:" not in text


def test_json_is_one_plain_object() -> None:
    data = json.loads(json.dumps(status().to_json()))
    assert data["progress"] == 0.3 and data["workers_online"] == 1 and data["head_hash"] == "00" * 32
    assert data["recent"][0]["retention"] == {"reversal": 0.97} and data["workers"][0]["rejects"] == {"WRONG_HEAD": 1}
