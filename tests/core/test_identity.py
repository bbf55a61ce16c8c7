"""Keys, key files, fingerprints and domain separation of signatures."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from swarmtune import identity
from tests.support.cli_runner import run_cli


def test_sign_verify_roundtrip_and_rejects_other_payload_or_key() -> None:
    key = identity.generate_key()
    public = identity.public_key_bytes(key)
    signature = identity.sign(key, identity.CONTEXT_RESULT, b"payload")
    assert len(public) == identity.PUBLIC_KEY_BYTES and len(signature) == identity.SIGNATURE_BYTES
    assert identity.verify(public, identity.CONTEXT_RESULT, b"payload", signature)
    assert not identity.verify(public, identity.CONTEXT_RESULT, b"payloaD", signature)
    other = identity.public_key_bytes(identity.generate_key())
    assert not identity.verify(other, identity.CONTEXT_RESULT, b"payload", signature)


@pytest.mark.parametrize(
    "context",
    [
        identity.CONTEXT_ENTRY,
        identity.CONTEXT_RETENTION,
        identity.CONTEXT_ATTESTATION,
        "worker-resul",
        "worker-results",
    ],
)
def test_signature_of_one_kind_never_verifies_as_another(context: str) -> None:
    key = identity.generate_key()
    signature = identity.sign(key, identity.CONTEXT_RESULT, b"same bytes")
    assert not identity.verify(identity.public_key_bytes(key), context, b"same bytes", signature)


def test_context_and_payload_cannot_be_shifted_into_each_other() -> None:
    # Moving bytes between context and payload must change the signed message.
    assert identity.signed_message("ab", b"c") != identity.signed_message("a", b"bc")
    with pytest.raises(ValueError):
        identity.signed_message("a\x00b", b"")
    with pytest.raises(ValueError):
        identity.signed_message("", b"x")


def test_signed_message_layout_is_the_documented_one() -> None:
    assert identity.signed_message("worker-result", b"\x01\x02") == b"swarmtune/v1/worker-result\x00\x01\x02"


def test_verify_is_false_not_an_exception_for_bad_keys_and_signatures() -> None:
    key = identity.generate_key()
    signature = identity.sign(key, "x", b"m")
    assert not identity.verify(b"short", "x", b"m", signature)
    assert not identity.verify(identity.public_key_bytes(key), "x", b"m", signature[:10])


def test_fingerprint_is_short_stable_and_distinct() -> None:
    a = identity.public_key_bytes(identity.generate_key())
    b = identity.public_key_bytes(identity.generate_key())
    assert identity.fingerprint(a) == identity.fingerprint(a)
    assert len(identity.fingerprint(a)) == 16 and identity.fingerprint(a) != identity.fingerprint(b)


def test_key_file_is_private_roundtrips_and_is_never_overwritten(tmp_path: Path) -> None:
    key = identity.generate_key()
    path = tmp_path / "worker.key"
    identity.save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert identity.public_key_bytes(identity.load_private_key(path)) == identity.public_key_bytes(key)
    before = path.read_bytes()
    with pytest.raises(identity.IdentityError, match="already exists"):
        identity.save_private_key(identity.generate_key(), path)
    assert path.read_bytes() == before


def test_loading_a_missing_or_foreign_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(identity.IdentityError, match="swarmtune keygen"):
        identity.load_private_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    with pytest.raises(identity.IdentityError, match="not an unencrypted PEM"):
        identity.load_private_key(junk)


def test_keygen_command_writes_key_and_prints_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.pem"
    assert run_cli(monkeypatch, "keygen", "--out", str(path), "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    public = identity.public_key_bytes(identity.load_private_key(path))
    assert shown["public_key"] == public.hex() and shown["fingerprint"] == identity.fingerprint(public)
    assert run_cli(monkeypatch, "keygen", "--out", str(path)) == 2
    assert "already exists" in capsys.readouterr().err
