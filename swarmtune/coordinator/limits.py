"""Bounds on what workers may ask of the coordinator, and Refused: a whole call turned away."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one worker (or a crowd of them) from exhausting the coordinator."""

    max_batches_per_call: int = 4096  # result batches (a worker sends one or a few per call)
    max_retention_per_call: int = 16
    calls_per_s: float = 100.0  # per worker: submissions and attestations together (a fast worker makes ~2 an iteration)
    call_burst: float = 200.0
    joins_per_s: float = 500.0  # all workers together: challenges and joins verify signatures
    join_burst: float = 2000.0
    challenges: int = 10_000  # outstanding join nonces
    challenge_lifetime_s: float = 60.0
    queue_limit: int = 1024  # unread announcements before a subscriber is cut loose

    def check_submission(self, batches: int, retention: int) -> None:
        """Refuse a submission of more items than one call may carry."""
        if batches > self.max_batches_per_call or retention > self.max_retention_per_call:
            raise Refused(
                "INVALID_ARGUMENT",
                f"at most {self.max_batches_per_call} result batches and {self.max_retention_per_call} retention reports per call; split the submission",
            )


class Refused(Exception):
    """A whole call refused; `code` names the gRPC status (e.g. "UNAUTHENTICATED")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
