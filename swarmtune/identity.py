"""Ed25519 identities: key files, fingerprints and domain-separated signatures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# Signing contexts, one per message kind (docs/PROTOCOL.md §5). A signature is over
# DOMAIN + context + NUL + payload; contexts never contain NUL, so no (context, payload) pair
# can produce the signed bytes of another pair: a signature of one kind never verifies as another.
DOMAIN = b"swarmtune/v1/"
CONTEXT_ENTRY = "ledger-entry"
CONTEXT_RESULT = "worker-result"
CONTEXT_BATCH = "result-batch"
CONTEXT_DIGEST = "iteration-digest"
CONTEXT_RETENTION = "retention-report"
CONTEXT_ATTESTATION = "state-attestation"

KEYGEN_HINT = "create one with `swarmtune keygen --out FILE`"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(Exception):
    """A key file cannot be written or read; the message says what to do."""


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public key, the form the ledger records."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes_raw()


def fingerprint(public_key: bytes) -> str:
    """Short human-comparable name of a public key: hex of the first 8 bytes of its sha256."""
    return hashlib.sha256(public_key).digest()[:8].hex()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key as unencrypted PKCS#8 PEM, mode 0600; never overwrite an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; choose another path or remove it first") from None
    except OSError as exc:
        raise IdentityError(f"cannot create {path}: {exc.strerror}; check that its directory is writable") from None
    with os.fdopen(fd, "wb") as out:
        out.write(private_key_pem(key))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a key written by `save_private_key` (or any unencrypted Ed25519 PKCS#8 PEM)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc.strerror}; {KEYGEN_HINT}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path} is not an unencrypted PEM private key ({exc}); {KEYGEN_HINT}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; {KEYGEN_HINT}")
    return key


def load_public_key(public_key: bytes) -> Ed25519PublicKey:
    """Parse 32 raw public key bytes; raises ValueError if they are not a valid key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return Ed25519PublicKey.from_public_bytes(public_key)


def signed_message(context: str, payload: bytes) -> bytes:
    """The exact bytes a signature covers for `payload` of kind `context`."""
    encoded = context.encode("ascii")
    if not encoded or b"\x00" in encoded:
        raise ValueError(f"signing context must be non-empty ASCII without NUL, got {context!r}")
    return DOMAIN + encoded + b"\x00" + payload


def sign(key: Ed25519PrivateKey, context: str, payload: bytes) -> bytes:
    return key.sign(signed_message(context, payload))


def verify(public_key: bytes | Ed25519PublicKey, context: str, payload: bytes, signature: bytes) -> bool:
    """True iff `signature` is the holder of `public_key` signing `payload` as `context`."""
    try:
        key = load_public_key(public_key) if isinstance(public_key, bytes) else public_key
        key.verify(signature, signed_message(context, payload))
    except (InvalidSignature, ValueError):
        return False
    return True
