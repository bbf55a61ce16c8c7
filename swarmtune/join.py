"""Join proofs: what a worker signs with its key to open a session with a job's coordinator."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from swarmtune import identity
from swarmtune.wire import service_pb2 as pb

# Signing context of JoinProof bytes (a kind of its own: a join proof never verifies as anything else).
CONTEXT_JOIN = "worker-join"
MAX_OPERATOR_ID = 128


class JoinError(ValueError):
    """A join request that proves nothing; the message says what is wrong."""


@dataclass(frozen=True)
class JoinProof:
    """A worker's signed claim: my key, my capacity and my operator, for this job and nonce."""

    job_id: str
    nonce: bytes
    worker_key: bytes
    capacity: int
    operator_id: str


def join_request(key: Ed25519PrivateKey, job_id: str, nonce: bytes, capacity: int, operator_id: str) -> pb.JoinRequest:
    """The JoinRequest a worker sends: the proof serialized once and signed under CONTEXT_JOIN."""
    proof = pb.JoinProof(
        job_id=job_id,
        nonce=nonce,
        worker_key=identity.public_key_bytes(key),
        capacity=capacity,
        operator_id=operator_id,
    ).SerializeToString()
    return pb.JoinRequest(proof=proof, signature=identity.sign(key, CONTEXT_JOIN, proof))


def open_join_request(request: pb.JoinRequest) -> JoinProof:
    """The proof a JoinRequest carries, once its signature verifies; raises JoinError otherwise."""
    try:
        message = pb.JoinProof.FromString(request.proof)
    except DecodeError:
        raise JoinError("proof is not a serialized JoinProof") from None
    if len(message.worker_key) != identity.PUBLIC_KEY_BYTES:
        raise JoinError(f"worker_key must be {identity.PUBLIC_KEY_BYTES} bytes, got {len(message.worker_key)}")
    if not identity.verify(message.worker_key, CONTEXT_JOIN, request.proof, request.signature):
        raise JoinError("signature does not verify: sign the exact proof bytes with the worker key, context 'worker-join'")
    if message.capacity < 1:
        raise JoinError("capacity must be at least 1 member per iteration")
    if len(message.operator_id) > MAX_OPERATOR_ID:
        raise JoinError(f"operator_id is longer than {MAX_OPERATOR_ID} characters")
    return JoinProof(message.job_id, message.nonce, message.worker_key, message.capacity, message.operator_id)
