"""Replay from ledger entries: the base state is checked against genesis, iterations apply exactly, in order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from swarmtune import entries, ledger, ledgerfile, state
from swarmtune.modelbuild import build_tokenizer
from swarmtune.spillfile import SpillFile
from swarmtune.fixedpoint import Q_DTYPE
from swarmtune.replay import ReplayError, base_state, replay, replica_from_genesis
from swarmtune.update import decay_integer
from tests.support import replay_ledger
from tests.support.cli_runner import run_cli
from tests.support.replay_ledger import build_ledger, direct_hashes
from tests.support.tiny_models import tiny_llama


def test_replay_equals_the_direct_updates_and_stops_where_asked() -> None:
    model = tiny_llama(hidden=16)
    stored = build_ledger(model)
    expected = direct_hashes(model, stored)
    verified = [entry for _, entry in ledger.walk(stored)]
    seen: list[tuple[int, bytes]] = []
    result = replay(model, verified, on_iteration=lambda replica, target: seen.append((replica.iteration, replica.state_hash())))
    assert result.iteration == 3 and result.state_hash == expected[-1] and result.entries == 4
    assert seen == [(1, expected[0]), (2, expected[1]), (3, expected[2])]
    partial = replay(model, verified, until=2)
    assert partial.state_hash == expected[1] and partial.head_hash == verified[2].hash
    assert replay(model, verified, until=0).state_hash == verified[0].entry.body.base_state_hash  # type: ignore[union-attr]
    with pytest.raises(ReplayError, match="beyond the ledger's last iteration 3"):
        replay(model, verified, until=4)


def test_iterations_apply_only_in_ledger_order() -> None:
    model = tiny_llama(hidden=16)
    verified = [entry for _, entry in ledger.walk(build_ledger(model))]
    replica = replica_from_genesis(model, verified[0].entry.body)  # type: ignore[arg-type]
    with pytest.raises(ReplayError, match="cannot follow iteration 0"):
        replica.apply(verified[2].entry.body)  # type: ignore[arg-type]


def test_another_base_model_is_refused_with_what_differs() -> None:
    stored = build_ledger(tiny_llama(hidden=16), iterations=0)
    genesis = entries.parse_entry(stored[0]).entry.body
    assert isinstance(genesis, entries.Genesis)
    other = tiny_llama(hidden=16)
    weight = other.get_parameter("model.layers.0.mlp.down_proj.weight").data.view(-1)
    weight[weight.abs().argmin()] += 2.0**-10  # the same exponents (not the largest), another weight
    with pytest.raises(ReplayError, match="hashes to .* genesis records"):
        base_state(other, genesis)
    with pytest.raises(ReplayError, match="not the job's base model: tensor .* has exponent"):
        base_state(tiny_llama(seed=1, hidden=16), genesis)
    with pytest.raises(ReplayError, match="not the job's base model"):
        base_state(tiny_llama(hidden=32), genesis)


def test_a_tampered_ledger_is_refused_before_replay() -> None:
    stored = build_ledger(tiny_llama(hidden=16))
    with pytest.raises(ledger.LedgerError, match="an entry is missing"):
        list(ledger.walk([stored[0], stored[2]]))


def test_replay_command_prints_the_hash_after_every_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_llama(hidden=16, tie=False)
    model.save_pretrained(tmp_path / "model")
    build_tokenizer(tmp_path / "model")  # a model directory as workers load it
    stored = build_ledger(model)
    ledgerfile.write(tmp_path / "ledger.bin", stored)
    expected = direct_hashes(model, stored)
    code = run_cli(monkeypatch, "replay", "--ledger", str(tmp_path / "ledger.bin"), "--model", str(tmp_path / "model"), "--each", "--json")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [line["state_hash"] for line in lines[:-1]] == [h.hex() for h in expected]
    assert lines[-1]["iteration"] == 3 and lines[-1]["state_hash"] == expected[-1].hex()
    assert run_cli(monkeypatch, "replay", "--ledger", str(tmp_path / "ledger.bin"), "--model", str(tmp_path / "model"), "--until", "1") == 0
    assert capsys.readouterr().out.strip() == expected[0].hex()
    assert run_cli(monkeypatch, "replay", "--ledger", str(tmp_path / "missing.bin"), "--model", str(tmp_path / "model")) == 2
    assert "export the ledger again" in capsys.readouterr().err


def test_a_version_1_ledger_is_refused_at_genesis_with_the_release_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(entries, "PROTOCOL_VERSION", "swarmtune/1")
        old = build_ledger(tiny_llama(hidden=16), iterations=1)
        patch.setattr(entries, "PROTOCOL_VERSION", "swarmtune/7")
        future = build_ledger(tiny_llama(hidden=16), iterations=0)
    expected = "version 1 ledger (swarmtune/1): replay it with swarmtune 0.1 (pip install 'swarmtune==0.1.*')"
    with pytest.raises(ledger.LedgerError, match=re.escape(expected)):
        ledger.start(old[0])
    with pytest.raises(ledger.LedgerError, match="'swarmtune/7' is not this swarmtune's 'swarmtune/2'"):
        list(ledger.walk(future))
    assert entries.PROTOCOL_VERSION == "swarmtune/2"


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_a_replica_keeps_no_base_copy_unless_anchored_decay_reads_it(decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without decay the base is the current state (updated in place); with it, a spill file, not memory."""
    model = tiny_llama(hidden=16)
    monkeypatch.setattr(replay_ledger, "SPEC", replay_ledger.SPEC.replace(b"anchored_decay = 0.01", f"anchored_decay = {decay}".encode()))
    monkeypatch.setattr(replay_ledger, "decay_integer", lambda _: decay_integer(decay))
    stored = build_ledger(model, iterations=2)
    expected = direct_hashes(model, stored)
    verified = [entry for _, entry in ledger.walk(stored)]
    replica = replica_from_genesis(model, verified[0].entry.body)  # type: ignore[arg-type]
    assert isinstance(replica.base, SpillFile) if decay else replica.base is None
    first_q = replica.state.q[0]
    for entry, after in zip(verified[1:], expected):
        replica.apply(entry.entry.body)  # type: ignore[arg-type]
        assert replica.state_hash() == after and replica.state.q[0] is first_q  # in place
    assert all(q.dtype == Q_DTYPE for q in replica.state.q)


def test_restore_declares_a_state_written_in_place() -> None:
    """A snapshot loader writes Q in place, then restore(t): the replica goes on from t + 1."""
    model = tiny_llama(hidden=16)
    stored = build_ledger(model)
    expected = direct_hashes(model, stored)
    verified = [entry for _, entry in ledger.walk(stored)]
    source = replay(model, verified, until=2).replica
    replica = replica_from_genesis(model, verified[0].entry.body)  # type: ignore[arg-type]
    for target, q in zip(replica.state.q, source.state.q):
        target.copy_(q)
    replica.restore(2)
    assert replica.iteration == 2 and replica.state_hash() == expected[1]
    replica.apply(verified[3].entry.body)  # type: ignore[arg-type]
    assert replica.state_hash() == expected[2]
    with pytest.raises(ReplayError, match="iterations count from 0"):
        replica.restore(-1)
