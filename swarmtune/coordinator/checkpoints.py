"""Which iteration is ready to checkpoint, given the attestations the ledger holds (pure)."""

from __future__ import annotations

from typing import Collection, Iterable, Mapping

from swarmtune import entries
from swarmtune.entries import Attestation, Checkpoint, Signed

# worker key -> iteration -> the signed attestation's bytes, as History.attested keeps them
Attested = Mapping[bytes, Mapping[int, bytes]]


def agreeing(attested: Attested, iteration: int, admitted: Collection[bytes]) -> dict[bytes, list[Signed[Attestation]]]:
    """State hash -> the admitted workers' attestations of it at `iteration`, in worker-key order
    (a revoked worker's attestation no longer counts: the ledger would refuse it in a checkpoint)."""
    by_hash: dict[bytes, list[Signed[Attestation]]] = {}
    for key in sorted(attested):
        signed = attested[key].get(iteration)
        if signed is not None and key in admitted:
            attestation = entries.decode_signed(Attestation, signed)
            by_hash.setdefault(attestation.record.state_hash, []).append(attestation)
    return by_hash


def checkpoint_at(attested: Attested, iteration: int, admitted: Collection[bytes], quorum: int) -> Checkpoint | None:
    """The checkpoint of `iteration` if at least `quorum` distinct workers attest one state hash and
    no other hash has as many attestors (a split vote is no checkpoint); None otherwise."""
    counted = sorted(agreeing(attested, iteration, admitted).items(), key=lambda item: -len(item[1]))
    if not counted or len(counted[0][1]) < quorum:
        return None
    if len(counted) > 1 and len(counted[1][1]) == len(counted[0][1]):
        return None
    state_hash, attestations = counted[0]
    return Checkpoint(iteration, state_hash, tuple(attestations), quorum)


def due_checkpoint(
    attested: Attested, admitted: Collection[bytes], every: int, quorum: int, iterations: Iterable[int], last_checkpoint: int
) -> Checkpoint | None:
    """The newest checkpoint ready among `iterations` (those that are multiples of `every`, after
    `last_checkpoint`); None when checkpoints are off or none is ready. A late joiner starts from the
    newest checkpoint, so one older than the last checkpoint is never appended."""
    if every <= 0:
        return None
    due = sorted({t for t in iterations if t > last_checkpoint and t % every == 0}, reverse=True)
    return next((c for t in due if (c := checkpoint_at(attested, t, admitted, quorum)) is not None), None)
