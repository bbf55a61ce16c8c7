"""Replay from ledger entries: the base state is checked against genesis, iterations apply exactly, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmtune import entries, ledger, ledgerfile, state
from swarmtune.modelbuild import build_tokenizer
from swarmtune.replay import ReplayError, base_state, replay, replica_from_genesis
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
    assert replay(model, verified, until=0).state_hash == state.state_hash(partial.replica.base)
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
    with pytest.raises(ReplayError, match="hashes to .* genesis records"):
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
