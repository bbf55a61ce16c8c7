"""The way in: rate-limited join challenges, join proofs checked against them, and workers' sessions."""

from __future__ import annotations

import time

from swarmtune.coordinator.limits import Limits, Refused
from swarmtune.coordinator.sessions import Challenges, Session, Sessions, full_bucket
from swarmtune.join import JoinError, JoinProof, open_join_request
from swarmtune.wire import service_pb2 as pb


class Gate:
    """Issues challenges, checks join proofs and looks up sessions, charging each call to its limit."""

    def __init__(self, job_id: str, limits: Limits) -> None:
        self._job_id = job_id
        self._limits = limits
        self._challenges = Challenges(limits.challenges, limits.challenge_lifetime_s)
        self._join_bucket = full_bucket(limits.joins_per_s, limits.join_burst, time.monotonic())
        self.sessions = Sessions(limits.calls_per_s, limits.call_burst)

    def challenge(self, genesis_hash: bytes) -> pb.Challenge:
        self._charge_join()
        issued = self._challenges.issue(time.time())
        if issued is None:
            raise Refused("RESOURCE_EXHAUSTED", "too many join challenges outstanding; retry in a few seconds")
        nonce, expires_s = issued
        return pb.Challenge(nonce=nonce, job_id=self._job_id, genesis_hash=genesis_hash, expires_ms=int(expires_s * 1000))

    def proof(self, request: pb.JoinRequest) -> JoinProof:
        """The join's proof, signed over a nonce we issued for this job (redeemed here, once)."""
        self._charge_join()
        try:
            proof = open_join_request(request)
        except JoinError as exc:
            raise Refused("UNAUTHENTICATED", str(exc)) from None
        if proof.job_id != self._job_id:
            raise Refused("FAILED_PRECONDITION", f"this coordinator runs job {self._job_id!r}, not {proof.job_id!r}")
        if not self._challenges.redeem(proof.nonce, time.time()):
            raise Refused("UNAUTHENTICATED", "unknown, used or expired nonce; call GetChallenge and join again at once")
        return proof

    def session(self, token: bytes, charge: bool) -> Session:
        """The session a call names; `charge` counts the call against the worker's rate limit."""
        session = self.sessions.get(token)
        if session is None:
            raise Refused("UNAUTHENTICATED", "unknown session (the coordinator restarted, or you joined again); join again")
        if charge and not self.sessions.allow(session, time.monotonic()):
            raise Refused(
                "RESOURCE_EXHAUSTED",
                f"rate limit: at most {self._limits.calls_per_s:.0f} calls/s per worker; batch results and back off",
            )
        return session

    def _charge_join(self) -> None:
        bucket = self._join_bucket.take(time.monotonic())
        if bucket is None:
            raise Refused("RESOURCE_EXHAUSTED", f"more than {self._limits.joins_per_s:.0f} joins per second; retry with backoff")
        self._join_bucket = bucket
