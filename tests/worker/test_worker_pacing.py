"""The worker's results reach a real coordinator paced: a fast dense worker stays within its rate limit."""

from __future__ import annotations

import asyncio
import io
import json
import time
from functools import partial
from pathlib import Path

from swarmtune import batches, identity
from swarmtune.coordinator.limits import Limits
from swarmtune.store import connect
from swarmtune.worker.config import WorkerConfig
from swarmtune.worker.daemon import Daemon
from swarmtune.worker.logs import EventLog
from swarmtune.worker.outbox import PARTIAL_SUBMIT_INTERVAL_S
from swarmtune.worker.session import Connection, open_channel
from swarmtune.worker.work import IterationWork, opened_from
from tests.support.coordinator_harness import in_process, spec_text, until

MEMBERS = 12
EVALUATION_S = 0.004  # one dense member of a tiny model


def test_results_of_a_fast_worker_go_out_paced_and_all_are_taken(redis_url: str, job_id: str, tmp_path: Path) -> None:
    key = identity.generate_key()
    out = io.StringIO()
    spec = spec_text(job_id, population=MEMBERS, iterations=1)

    evaluating_s: list[float] = []

    async def scenario() -> None:
        # Twelve calls in 50 ms would spend this burst; paced, the share takes a handful.
        limits = Limits(calls_per_s=2.0, call_burst=6.0)
        async with in_process(connect(redis_url), spec, (identity.public_key_bytes(key),), limits=limits) as c:
            # Only the daemon's outbox runs here: no model, no backend, no connection of its own.
            daemon = Daemon(WorkerConfig("unused", tmp_path / "unused.key", capacity=MEMBERS), key, lambda *a: None, EventLog(True, out))  # type: ignore[arg-type, return-value]
            connection = Connection(open_channel(f"127.0.0.1:{c.running.port}", None))
            joined = await connection.join(key, MEMBERS, "")
            stream = connection.subscribe(joined, 1)
            await c.job.start()
            runner = asyncio.create_task(c.job.run())
            message = await anext(aiter(stream))
            assert message.WhichOneof("kind") == "opened"
            opened = opened_from(message.opened)
            work = IterationWork(opened, partial(batches.sign_batch, key, c.job.spec.job_id, opened.iteration, opened.head_hash))
            work.assign(message.opened.assigned)
            daemon.work = work
            sender = asyncio.create_task(daemon.outbox.send_forever(connection, joined))
            started = time.monotonic()
            for member in work.pending():  # "evaluating" one member after another, as a dense worker does
                await asyncio.sleep(EVALUATION_S)
                work.record({member.member: 0.5})
                daemon.outbox.notify()
            evaluating_s.append(time.monotonic() - started)  # as long as this machine took, not as planned
            await asyncio.wait_for(c.job.finished.wait(), 10)
            # the reply to the share's last call may come after the close
            await until(lambda: not work.unsent, lambda: f"{len(work.unsent)} results still unsent")
            sender.cancel()
            stream.cancel()
            runner.cancel()
            await connection.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    submitted = [e for e in events if e["event"] == "submitted"]
    assert sum(e["results"] for e in submitted) == MEMBERS
    assert not [e for e in events if e["event"] == "rejected"]
    # At most one call per interval while members were coming, plus the one that completed the share.
    assert len(submitted) <= evaluating_s[0] / PARTIAL_SUBMIT_INTERVAL_S + 2
    assert max(e["ts"] for e in submitted) - min(e["ts"] for e in submitted) < evaluating_s[0] + 1.0  # no back-off from a refusal
