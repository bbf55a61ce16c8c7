"""Entry and record building, sealing and parsing: exact bytes in, the same view out."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmtune import entries, identity
from swarmtune.entries import Attestation, RetentionReport, Signed
from swarmtune.wire import ledger_pb2 as pb
from tests.support.ledger_factory import sound_chain


def _worker_record() -> tuple[Ed25519PrivateKey, RetentionReport]:
    worker = identity.generate_key()
    return worker, RetentionReport("job-a", 2**64 - 1, bytes(32), identity.public_key_bytes(worker), (("probe", -0.5),))


def test_every_kind_roundtrips_through_seal_and_parse() -> None:
    chain = sound_chain(iterations=2)
    kinds = []
    for stored in chain.stored:
        parsed = entries.parse_entry(stored)
        assert parsed.stored == stored and parsed.hash == hashlib.sha256(stored).digest()
        resealed = entries.seal(chain.coordinator, parsed.entry)
        assert entries.parse_entry(resealed).entry == parsed.entry
        kinds.append(parsed.kind)
    assert set(kinds) == {"genesis", "iteration", "admission", "revocation", "attestation", "checkpoint"}


def test_stored_bytes_are_a_signed_entry_whose_signature_covers_the_envelope() -> None:
    chain = sound_chain(iterations=1)
    parsed = entries.parse_entry(chain.stored[1])
    message = pb.SignedEntry.FromString(chain.stored[1])
    assert message.entry == parsed.envelope and message.signature == parsed.signature
    assert identity.verify(
        identity.public_key_bytes(chain.coordinator), identity.CONTEXT_ENTRY, parsed.envelope, parsed.signature
    )
    assert entries.verify_seal(parsed, identity.public_key_bytes(chain.coordinator))
    assert not entries.verify_seal(parsed, identity.public_key_bytes(identity.generate_key()))


def test_chaining_helpers_link_index_and_hash() -> None:
    chain = sound_chain(iterations=1)
    first = entries.parse_entry(chain.stored[0])
    assert first.entry.index == 0 and first.entry.prev_hash == entries.ZERO_HASH
    second = entries.parse_entry(chain.stored[1])
    assert second.entry.index == 1 and second.entry.prev_hash == first.hash
    header = entries.read_header(chain.stored[1])
    assert (header.index, header.prev_hash, header.job_id, header.hash) == (1, first.hash, "job-test", second.hash)


def test_genesis_records_the_spec_digest() -> None:
    genesis = entries.new_genesis(
        b"spec", bytes(32), bytes(32), protocol_version="p", noise_version="n", shaping_version="s"
    )
    assert genesis.job_spec_sha256 == hashlib.sha256(b"spec").digest()


def test_signed_record_keeps_the_exact_body_bytes_and_verifies() -> None:
    worker, record = _worker_record()
    signed = entries.sign_record(worker, record)
    wire = entries.encode_signed(signed)
    decoded = entries.decode_signed(RetentionReport, wire)
    assert decoded == signed and decoded.record == record
    assert entries.verify_record(decoded)
    tampered = Signed(record, signed.body[:-1] + bytes([signed.body[-1] ^ 1]), signed.signature)
    assert not entries.verify_record(tampered)


def test_record_signed_as_one_kind_does_not_verify_as_another() -> None:
    worker = identity.generate_key()
    key = identity.public_key_bytes(worker)
    attestation = entries.sign_record(worker, Attestation("job-a", 3, bytes(32), key))
    # The same body bytes and signature presented as a retention report: the context differs.
    body = pb.Attestation.FromString(attestation.body)
    claimed = RetentionReport(body.job_id, body.iteration, b"", key, ())
    as_retention = Signed(claimed, attestation.body, attestation.signature)
    assert entries.verify_record(attestation)
    assert not entries.verify_record(as_retention)


@pytest.mark.parametrize("garbage", [b"", b"\xff", b"\x0a\x05abc", b"\x0a\x02\x08\x01", bytes(range(40))])
def test_parse_rejects_garbage_with_entry_error(garbage: bytes) -> None:
    with pytest.raises(entries.EntryError):
        entries.parse_entry(garbage)


def test_parse_names_the_kind_when_a_nested_record_is_corrupt() -> None:
    chain = sound_chain(iterations=1)
    envelope = pb.Entry.FromString(entries.parse_entry(chain.stored[1]).envelope)
    envelope.iteration.batches[2].members = b"\x00"  # a zero gap: not a canonical member list
    stored = pb.SignedEntry(entry=envelope.SerializeToString(), signature=bytes(64)).SerializeToString()
    with pytest.raises(entries.EntryError, match="batch 2") as caught:
        entries.parse_entry(stored)
    assert caught.value.kind == "iteration"


def test_decode_signed_rejects_garbage() -> None:
    with pytest.raises(entries.EntryError):
        entries.decode_signed(Attestation, b"\x0a\x03\xff\xff\xff")


@pytest.mark.parametrize("job_id", ["", "a b", "x" * 65, "job/1", "{job}", "é"])
def test_job_ids_outside_the_portable_alphabet_are_refused(job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        entries.check_job_id(job_id)
    assert entries.check_job_id("Job_1.a-b") == "Job_1.a-b"
