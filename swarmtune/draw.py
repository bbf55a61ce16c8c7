"""The iteration's draw: a coordinator signature nobody can predict or grind, and what it decides.

The draw is the coordinator's Ed25519 signature over (job, iteration, opened head) under its own
context. Ed25519 signs deterministically, so the coordinator cannot try several draws; without its
key nobody can compute it before the iteration opens; with its public key everybody can check it
afterwards. Every choice that an attacker would like to steer (the order candidates are preferred
in, who gets an extra replica, which members a referee re-evaluates) is a hash of the draw.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarmtune import identity

CONTEXT_DRAW = "iteration-draw"
_SPOT_SCALE = 1 << 64  # a member is spot-checked iff its 64-bit ticket < spot_check * 2^64


def draw_message(job_id: str, iteration: int, opened_head: bytes) -> bytes:
    """What the draw signs: length-prefixed job id, the iteration and the head it opened at."""
    job = job_id.encode("utf-8")
    return struct.pack(">I", len(job)) + job + struct.pack(">Q", iteration) + opened_head


def make_draw(key: Ed25519PrivateKey, job_id: str, iteration: int, opened_head: bytes) -> bytes:
    return identity.sign(key, CONTEXT_DRAW, draw_message(job_id, iteration, opened_head))


def verify_draw(coordinator_key: bytes | Ed25519PublicKey, job_id: str, iteration: int, opened_head: bytes, draw: bytes) -> bool:
    return identity.verify(coordinator_key, CONTEXT_DRAW, draw_message(job_id, iteration, opened_head), draw)


def _ticket(draw: bytes, label: bytes, *parts: bytes) -> bytes:
    digest = hashlib.sha256(label + b"\x00" + draw)
    for part in parts:
        digest.update(part)
    return digest.digest()


def keyed_order(draw: bytes, keys: Iterable[bytes]) -> list[bytes]:
    """The keys shuffled by the draw (a keyed sort: the same draw and keys give the same order)."""
    return sorted(set(keys), key=lambda key: (_ticket(draw, b"order", key), key))


def member_rank(draw: bytes, member: int, key: bytes) -> bytes:
    """Preference of `key` for an extra replica of `member`: lowest first, fresh per member."""
    return _ticket(draw, b"extra", struct.pack(">I", member), key)


def spot_checks(draw: bytes, members: Sequence[int], rate: float) -> frozenset[int]:
    """Members a referee re-evaluates whatever their replicas say: each with probability `rate`."""
    threshold = int(rate * _SPOT_SCALE)
    return frozenset(m for m in members if int.from_bytes(_ticket(draw, b"spot", struct.pack(">I", m))[:8], "big") < threshold)
