"""Member seeds of an iteration, derived from the job seed: what the coordinator publishes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

U64 = (1 << 64) - 1


@dataclass(frozen=True)
class MemberNoise:
    """Member `member` of an iteration is perturbed by `sign` times the noise of `seed`."""

    member: int
    seed: int
    sign: int


def u64le(value: int) -> bytes:
    if not 0 <= value <= U64:
        raise ValueError(f"{value} does not fit an unsigned 64-bit integer")
    return value.to_bytes(8, "little")


def member_seed(job_seed: int, iteration: int, noise_index: int) -> int:
    """SHA-256 of the domain string and three u64le fields; the first 8 bytes as u64le."""
    payload = b"swarmtune/seed/v1" + u64le(job_seed) + u64le(iteration) + u64le(noise_index)
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def population(job_seed: int, iteration: int, size: int, antithetic: bool) -> tuple[MemberNoise, ...]:
    """The members of iteration t. Antithetic pairs (2j, 2j+1) share seed j with signs +1, -1."""
    if size < 1:
        raise ValueError("population size must be at least 1")
    if antithetic and size % 2:
        raise ValueError(f"antithetic sampling needs an even population, got {size}")
    return NoisePlan(job_seed, size, antithetic).members(iteration)


@dataclass(frozen=True)
class NoisePlan:
    """An iteration's members 0..population-1 and their noise, derived from the job seed (PROTOCOL §1.1)."""

    job_seed: int
    population: int
    antithetic: bool

    def noise(self, iteration: int, member: int) -> MemberNoise:
        """Member m's noise: antithetic pairs (2j, 2j+1) share seed j with signs +1, -1."""
        if self.antithetic:
            return MemberNoise(member, member_seed(self.job_seed, iteration, member // 2), 1 - 2 * (member % 2))
        return MemberNoise(member, member_seed(self.job_seed, iteration, member), 1)

    def members(self, iteration: int) -> tuple[MemberNoise, ...]:
        return tuple(self.noise(iteration, m) for m in range(self.population))
