"""Join challenges, worker sessions and per-worker rate limits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

NONCE_BYTES = 32
TOKEN_BYTES = 24


@dataclass(frozen=True)
class Session:
    """A joined worker: the key it proved, what it declared, and its opaque token."""

    token: bytes
    key: bytes
    operator: str
    capacity: int


@dataclass(frozen=True)
class Bucket:
    """A token bucket: `rate` calls per second on average, bursts up to `burst`."""

    rate: float
    burst: float
    tokens: float
    at_s: float

    def take(self, now_s: float) -> Bucket | None:
        """The bucket after one call, or None when the call exceeds the limit."""
        tokens = min(self.burst, self.tokens + (now_s - self.at_s) * self.rate)
        if tokens < 1.0:
            return None
        return Bucket(self.rate, self.burst, tokens - 1.0, now_s)  # on every call: not the slower dataclasses.replace


def full_bucket(rate: float, burst: float, now_s: float) -> Bucket:
    return Bucket(rate, burst, burst, now_s)


class Challenges:
    """Outstanding single-use join nonces, bounded in number and lifetime (no unbounded growth)."""

    def __init__(self, limit: int, lifetime_s: float) -> None:
        self._limit = limit
        self._lifetime_s = lifetime_s
        self._expiry: dict[bytes, float] = {}  # insertion order = expiry order

    def issue(self, now_s: float) -> tuple[bytes, float] | None:
        """A fresh nonce and its expiry, or None when too many are outstanding."""
        self._expire(now_s)
        if len(self._expiry) >= self._limit:
            return None
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._expiry[nonce] = now_s + self._lifetime_s
        return nonce, self._expiry[nonce]

    def redeem(self, nonce: bytes, now_s: float) -> bool:
        """True once per issued, unexpired nonce."""
        self._expire(now_s)
        return self._expiry.pop(nonce, None) is not None

    def _expire(self, now_s: float) -> None:
        for nonce, expiry in list(self._expiry.items()):
            if expiry > now_s:
                break
            del self._expiry[nonce]


class Sessions:
    """Live sessions, one per worker key: joining again replaces the worker's previous session."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._by_token: dict[bytes, Session] = {}
        self._token_of: dict[bytes, bytes] = {}
        self._buckets: dict[bytes, Bucket] = {}

    def open(self, key: bytes, operator: str, capacity: int, now_s: float) -> Session:
        stale = self._token_of.get(key)
        if stale is not None:
            del self._by_token[stale]
        session = Session(secrets.token_bytes(TOKEN_BYTES), key, operator, capacity)
        self._by_token[session.token] = session
        self._token_of[key] = session.token
        self._buckets[key] = full_bucket(self._rate, self._burst, now_s)
        return session

    def get(self, token: bytes) -> Session | None:
        return self._by_token.get(token)

    def current(self, key: bytes) -> Session | None:
        token = self._token_of.get(key)
        return None if token is None else self._by_token[token]

    def allow(self, session: Session, now_s: float) -> bool:
        """Charge one call to the worker's rate limit; False when it is exceeded."""
        bucket = self._buckets[session.key].take(now_s)
        if bucket is None:
            return False
        self._buckets[session.key] = bucket
        return True

    def close(self, key: bytes) -> None:
        """End a worker's session (e.g. its key was revoked)."""
        token = self._token_of.pop(key, None)
        if token is not None:
            del self._by_token[token]
            del self._buckets[key]
