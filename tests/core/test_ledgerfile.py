"""The portable ledger file and `swarmtune ledger export|import|verify`, fuzzed with corruptions."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmtune import entries, ledgerfile, store
from swarmtune.ledgerfile import LedgerFileError
from tests.support.cli_runner import run_cli
from tests.support.ledger_factory import ChainBuilder, sound_chain


@lru_cache(maxsize=1)
def _sound_file() -> bytes:
    """An exported ledger with every entry kind (built once: signing is the slow part)."""
    return ledgerfile.encode(sound_chain(iterations=2).stored)


def test_encode_decode_roundtrip_and_layout() -> None:
    stored = sound_chain(iterations=2).stored
    data = ledgerfile.encode(stored)
    assert data.startswith(b"SWTLEDGR\x01\x00\x00\x00")
    assert data.endswith(len(stored).to_bytes(8, "little") + entries.entry_hash(stored[-1]))
    assert ledgerfile.decode(data) == stored
    assert ledgerfile.decode(ledgerfile.encode([])) == []


def test_write_then_read_and_verify(tmp_path: Path) -> None:
    stored = sound_chain(iterations=2).stored
    path = tmp_path / "job.ledger"
    assert ledgerfile.write(path, iter(stored)) == len(stored)
    assert ledgerfile.read(path) == stored
    assert path.read_bytes() == ledgerfile.encode(stored)
    assert ledgerfile.verify_file(path).ok
    assert [p.name for p in tmp_path.iterdir()] == ["job.ledger"]  # no temp file left behind


@pytest.mark.parametrize(
    ("cut", "fragment"),
    [
        (lambda d: b"NOTLEDGR" + d[8:], "bad magic"),
        (lambda d: d[:8] + b"\x02\x00\x00\x00" + d[12:], "format version 2"),
        (lambda d: d[:-44], "no end mark"),  # cut exactly before the trailer
        (lambda d: d + b"\x00", "trailer after entry"),
        (lambda d: d[:-40] + bytes([d[-40] ^ 1]) + d[-39:], "trailer counts"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "trailer hash"),
        (lambda d: d[:12] + b"\xff\xff\xff\x0f" + d[16:], "past the end of the file"),
    ],
)
def test_format_damage_is_named(cut: object, fragment: str) -> None:
    with pytest.raises(LedgerFileError, match=fragment):
        ledgerfile.decode(cut(_sound_file()))  # type: ignore[operator]


def test_a_ledger_cut_at_an_entry_boundary_does_not_pass() -> None:
    stored = sound_chain(iterations=2).stored
    shorter = ledgerfile.encode(stored[:-2])
    full = ledgerfile.encode(stored)
    cut = full[: len(shorter) - 44]  # all records of the shorter ledger, none of its trailer
    assert not ledgerfile.verify_bytes(cut).ok


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_flipped_bytes_never_pass_and_never_crash(data: st.DataObject) -> None:
    original = _sound_file()
    corrupted = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        position = data.draw(st.integers(0, len(original) - 1), label="position")
        corrupted[position] ^= data.draw(st.integers(1, 255), label="xor")
    if bytes(corrupted) == original:  # two flips cancelled out
        return
    report = ledgerfile.verify_bytes(bytes(corrupted))
    assert not report.ok and report.problem is not None and report.problem.message


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_truncations_never_pass_and_never_crash(data: st.DataObject) -> None:
    original = _sound_file()
    length = data.draw(st.integers(0, len(original) - 1), label="length")
    report = ledgerfile.verify_bytes(original[:length])
    assert not report.ok and report.problem is not None


# ---- the CLI ---------------------------------------------------------------------------------


def _verify_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, dict]:
    code = run_cli(monkeypatch, "ledger", "verify", str(path), "--json")
    return code, json.loads(capsys.readouterr().out)


def test_export_import_verify_through_the_cli(
    tmp_path: Path, redis_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = sound_chain(iterations=2, job_id=job_id)
    with store.connect(redis_url) as db:
        for stored in chain.stored:
            db.append(stored)
    exported = tmp_path / "job.ledger"
    export = ("ledger", "export", "--redis-url", redis_url, "--job", job_id, "--out", str(exported))
    assert run_cli(monkeypatch, *export) == 0
    assert ledgerfile.read(exported) == chain.stored
    assert run_cli(monkeypatch, *export) == 2
    assert "--force" in capsys.readouterr().err

    # Into the embedded default (no URL), then out again without --job: the only job there.
    data_dir = tmp_path / "embedded"
    assert run_cli(monkeypatch, "ledger", "import", "--data-dir", str(data_dir), str(exported)) == 0
    assert f"{len(chain.stored)} new entries" in capsys.readouterr().out
    assert run_cli(monkeypatch, "ledger", "import", "--data-dir", str(data_dir), str(exported)) == 0
    assert "0 new entries" in capsys.readouterr().out  # importing twice is harmless
    again = tmp_path / "again.ledger"
    assert run_cli(monkeypatch, "ledger", "export", "--data-dir", str(data_dir), "--out", str(again)) == 0
    assert again.read_bytes() == exported.read_bytes()
    capsys.readouterr()

    code, report = _verify_json(monkeypatch, capsys, again)
    assert code == 0 and report["ok"] and report["entries"] == len(chain.stored) and report["job_id"] == job_id
    assert run_cli(monkeypatch, "ledger", "verify", str(again)) == 0
    assert "ledger OK" in capsys.readouterr().out


def test_verify_names_the_first_bad_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = list(sound_chain(iterations=2).stored)
    stored[3], stored[4] = stored[4], stored[3]
    path = tmp_path / "swapped.ledger"
    ledgerfile.write(path, stored)
    code, report = _verify_json(monkeypatch, capsys, path)
    assert code == 1 and report["problem"]["index"] == 3 and report["problem"]["kind"] == "attestation"
    assert run_cli(monkeypatch, "ledger", "verify", str(path)) == 1
    assert "entry 3 (attestation): has index 4 at position 3" in capsys.readouterr().out


def test_verify_of_a_corrupt_file_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cut.ledger"
    path.write_bytes(_sound_file()[:-7])
    code, report = _verify_json(monkeypatch, capsys, path)
    assert code == 1 and report["problem"]["kind"] == "file" and report["problem"]["index"] is None
    assert run_cli(monkeypatch, "ledger", "verify", str(tmp_path / "missing.ledger")) == 2
    assert "cannot read" in capsys.readouterr().err


def test_verify_pins_the_coordinator_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.ledger"
    path.write_bytes(_sound_file())
    assert run_cli(monkeypatch, "ledger", "verify", str(path), "--coordinator-key", "00" * 32) == 1
    assert "not the expected one" in capsys.readouterr().out
    assert run_cli(monkeypatch, "ledger", "verify", str(path), "--coordinator-key", "xyz") == 2


def test_import_refuses_a_bad_file_and_a_conflicting_ledger(
    tmp_path: Path, redis_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = list(sound_chain(iterations=2, job_id=job_id).stored)
    tampered = tmp_path / "tampered.ledger"
    ledgerfile.write(tampered, [*stored[:2], *stored[3:]])
    assert run_cli(monkeypatch, "ledger", "import", "--redis-url", redis_url, str(tampered)) == 2
    assert "does not verify, nothing imported: entry 2" in capsys.readouterr().err
    with store.connect(redis_url) as db:
        assert db.head(job_id) is None
        db.append(ChainBuilder(job_id).stored[0])  # another ledger under the same job id
    good = tmp_path / "good.ledger"
    ledgerfile.write(good, stored)
    assert run_cli(monkeypatch, "ledger", "import", "--redis-url", redis_url, str(good)) == 2
    assert "already holds a different ledger" in capsys.readouterr().err


def test_export_without_job_needs_exactly_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "db"
    code = run_cli(monkeypatch, "ledger", "export", "--data-dir", str(data_dir), "--out", str(tmp_path / "x"))
    assert code == 2 and "name one with --job" in capsys.readouterr().err


def test_export_of_an_unknown_job_or_to_a_missing_directory_says_what_to_do(
    tmp_path: Path, redis_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with store.connect(redis_url) as db:
        db.append(ChainBuilder(job_id).stored[0])
    export = ("ledger", "export", "--redis-url", redis_url, "--job")
    assert run_cli(monkeypatch, *export, "job-nope", "--out", str(tmp_path / "x.ledger")) == 2
    assert "job 'job-nope' has no ledger" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "dir.ledger"
    assert run_cli(monkeypatch, *export, job_id, "--out", str(missing)) == 2
    assert "check that its directory exists" in capsys.readouterr().err
