"""The worker's parts: open-iteration bookkeeping, retries, what it signs and measures, backend choice, entry handling."""

from __future__ import annotations

import asyncio
import io
import random
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import grpc
import pytest

from swarmtune import batches, entries, identity, ledger
from swarmtune.backends.registry import backend_factory
from swarmtune.entries import NoisePlan
from swarmtune.jobspec import parse_job_spec
from swarmtune.seeds import MemberNoise, population
from swarmtune.state import MasterState
from swarmtune.tasks.base import DatasetTask, Example, RewardFn
from swarmtune.wire import service_pb2 as pb
from swarmtune.worker.backoff import Backoff
from swarmtune.worker.config import WorkerConfig
from swarmtune.worker.daemon import Daemon
from swarmtune.worker.logs import EventLog
from swarmtune.worker.measure import evaluation_batch, prompt_batch, retention_figures
from swarmtune.worker.session import SessionLost, retried
from swarmtune.worker.site import Site, default_cache_mb
from swarmtune.worker.work import IterationWork, Opened
from tests.support.cli_runner import run_cli
from tests.support.ledger_factory import ChainBuilder
from tests.support.specs import job_spec

SPEC = parse_job_spec(b'[job]\nid = "w"\nseed = 3\nmodel = "m"\n[task]\nname = "t"\nprompts_per_iteration = 3\nmax_new_tokens = 2\n')
TASK = DatasetTask("t", (0.0, 1.0), tuple(Example(f"{i}+1=") for i in range(10)), (Example("a"), Example("bb")), lambda p, c, **k: [len(x) / 4 for x in c])


KEY = identity.generate_key()


def new_work(iteration: int = 1, size: int = 4) -> IterationWork:
    opened = Opened(iteration, b"h" * 32, NoisePlan(3, size, False), measure_retention=True)
    return IterationWork(opened, partial(batches.sign_batch, KEY, "w", iteration, b"h" * 32))


def statuses(*reasons: int) -> pb.SubmitReply:
    """The answer to one batch, member by member."""
    members = [pb.ItemStatus(reason=r) for r in reasons]
    return pb.SubmitReply(batches=[pb.BatchStatus(status=pb.ItemStatus(reason=pb.ACCEPTED), members=members)])


def test_work_evaluates_what_is_assigned_and_resends_until_taken() -> None:
    work = new_work()
    work.assign([0, 2, 9])  # 9 is no member: ignored
    assert work.pending() == [population(3, 1, 4, antithetic=False)[m] for m in (0, 2)]  # seeds from the plan
    work.record({0: 0.5})
    work.add([3])
    assert [m.member for m in work.pending()] == [2, 3]
    members, _ = work.untaken()
    assert members == [0]
    batch = batches.decode_batch(work.batch(members))
    assert (batch.members, batch.rewards) == ((0,), (0.5,)) and batches.verify_batch(batch)
    assert work.own_signatures() == {batch.signed}
    assert work.settle(members, statuses(pb.ACCEPTED), False) == []
    assert work.untaken()[0] == []
    work.assign([0, 1])  # after a reconnect: member 0 was measured, so it is resent, not re-evaluated
    assert work.untaken()[0] == [0] and [m.member for m in work.pending()] == [1]
    assert work.batch([0]) == batches.encode_batch(batch)  # a resend is the same bytes


def test_rejections_are_reported_once_and_not_resent() -> None:
    work = new_work()
    work.assign([0, 1])
    work.record({0: 0.5, 1: 0.5})
    members, _ = work.untaken()
    rejected = work.settle(members, statuses(pb.DUPLICATE, pb.NOT_ASSIGNED), False)
    assert [(m, s.reason) for m, s in rejected] == [(1, pb.NOT_ASSIGNED)]
    assert work.untaken()[0] == []


def test_a_batch_refused_whole_is_a_rejection_of_each_member() -> None:
    work = new_work()
    work.assign([0, 1])
    work.record({0: 0.5, 1: 0.5})
    refused = pb.SubmitReply(batches=[pb.BatchStatus(status=pb.ItemStatus(reason=pb.ITERATION_CLOSED))])
    assert [(m, s.reason) for m, s in work.settle([0, 1], refused, False)] == [(0, pb.ITERATION_CLOSED), (1, pb.ITERATION_CLOSED)]


def test_retention_is_measured_once_and_sent_with_the_results() -> None:
    work = new_work()
    assert work.retention_due()
    key = identity.generate_key()
    report = entries.sign_record(key, entries.RetentionReport("w", 1, b"h" * 32, identity.public_key_bytes(key), (("t", 0.5),)))
    work.record_retention(report)
    assert not work.retention_due() and len(work.untaken()[1]) == 1
    work.settle([], pb.SubmitReply(retention=[pb.ItemStatus(reason=pb.ACCEPTED)]), True)
    assert work.untaken()[1] == []


def test_dense_members_go_one_by_one_and_lowrank_all_at_once() -> None:
    members = list(population(3, 1, 5, antithetic=False))
    assert evaluation_batch(members, lowrank=False) == members[:1]
    assert evaluation_batch(members, lowrank=True) == members


def test_backoff_grows_to_its_cap_with_full_jitter() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0)
    assert [backoff.ceiling(n) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    rng = random.Random(1)
    assert all(0.0 <= backoff.delay(n, rng) <= backoff.ceiling(n) for n in range(50))


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="test")


def test_retried_calls_again_after_transient_failures_only() -> None:
    calls: list[int] = []

    def flaky(failures: int, code: grpc.StatusCode):  # type: ignore[no-untyped-def]
        async def call() -> str:
            calls.append(1)
            if len(calls) <= failures:
                raise rpc_error(code)
            return "ok"

        return call

    fast = Backoff(base_s=0.001, cap_s=0.001)
    assert asyncio.run(retried(flaky(2, grpc.StatusCode.UNAVAILABLE), fast, random.Random(0), 5)) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(retried(flaky(9, grpc.StatusCode.UNAVAILABLE), fast, random.Random(0), 3))
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(retried(flaky(1, grpc.StatusCode.INVALID_ARGUMENT), fast, random.Random(0), 3))
    assert len(calls) == 1
    with pytest.raises(SessionLost):
        asyncio.run(retried(flaky(9, grpc.StatusCode.UNAUTHENTICATED), fast, random.Random(0), 3))


def test_every_site_samples_the_same_prompts_for_an_iteration() -> None:
    first = prompt_batch(TASK, SPEC, 4)
    assert len(first) == 3 and first == prompt_batch(TASK, SPEC, 4)
    assert any(prompt_batch(TASK, SPEC, t) != first for t in range(5, 9))


@dataclass(frozen=True)
class Echo:
    """A backend whose completions repeat the prompt."""

    def set_center(self, state: MasterState) -> None: ...

    def evaluate(self, members: Sequence[MemberNoise], examples: Sequence[Example], reward_fn: RewardFn, max_new_tokens: int) -> list[float]:
        return []

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return list(prompts)


def test_retention_is_the_mean_held_out_reward_of_the_center_model() -> None:
    assert retention_figures(Echo(), TASK, SPEC) == (("t", (1 / 4 + 2 / 4) / 2),)


def test_worker_command_names_the_known_backends_for_another(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["worker", "--coordinator", "127.0.0.1:1", "--key", str(tmp_path / "none.key"), "--backend", "onnx"]
    assert run_cli(monkeypatch, *argv) == 2
    assert "unknown backend 'onnx': use one of hf, vllm" in capsys.readouterr().err


def test_chain_entries_are_verified_on_arrival_even_while_the_compute_thread_is_busy(tmp_path: Path) -> None:
    """Attestations (and admissions, revocations) never queue behind an evaluation, and are still verified."""
    chain = ChainBuilder(workers=2)
    chain.add(chain.iteration())
    state, _ = ledger.start(chain.stored[0])
    state, _ = ledger.advance(state, chain.stored[1])
    attestation = chain.add(chain.attestation(chain.workers[0], 1, bytes(32)))
    forged = bytearray(chain.add(chain.attestation(chain.workers[1], 1, bytes(32))))
    forged[-1] ^= 1  # the coordinator's seal no longer matches
    key = identity.generate_key()
    daemon = Daemon(WorkerConfig("unused", tmp_path / "unused.key"), key, backend_factory("hf"), EventLog(True, io.StringIO()))
    # Chain bookkeeping needs no replica, backend or model.
    daemon.site = Site(None, state, None, None, None, daemon.verifier)  # type: ignore[arg-type]
    evaluating = threading.Event()

    async def scenario() -> None:
        busy = daemon.pool.submit(evaluating.wait)  # a member being evaluated
        try:
            await asyncio.wait_for(daemon.on_entry(pb.LedgerEntry(index=2, stored=attestation)), 5)
            assert daemon.require_site().next_index == 3
            with pytest.raises(ledger.LedgerError):
                await daemon.on_entry(pb.LedgerEntry(index=3, stored=bytes(forged)))
            assert daemon.require_site().next_index == 3
            assert not busy.done()
        finally:
            evaluating.set()
            daemon.pool.shutdown()
            daemon.verifier.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "noise, megabytes",
    [({"family": "dense"}, 0), ({"family": "lowrank"}, 256), ({"family": "lowrank", "lowrank_others": "dense"}, 0)],
)
def test_the_default_noise_cache_holds_low_rank_factors_only(noise: dict[str, str], megabytes: int) -> None:
    """A dense noise cache would break the worker's memory bound (one seed is as large as the model)."""
    spec = parse_job_spec(job_spec("cache", model="builtin:tiny", task={"name": "arith"}, seed=1, noise=noise).encode())
    assert default_cache_mb(spec) == megabytes
