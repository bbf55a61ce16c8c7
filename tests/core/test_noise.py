"""The torch noise generator against the pure-Python reference of PROTOCOL §1."""

from __future__ import annotations

import pytest
import torch

from swarmtune import noise, seeds
from tests.support import spec_reference as ref


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 1000])
def test_rademacher_matches_reference(numel: int) -> None:
    key = noise.stream_key(123456789, 3, noise.ROLE_DENSE)
    assert noise.rademacher(key, numel).tolist() == ref.rademacher(key & ref.MASK, numel)


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 999])
def test_gaussian_matches_reference(numel: int) -> None:
    key = noise.stream_key(987654321, 0, noise.ROLE_DENSE)
    assert noise.gaussian(key, numel).tolist() == ref.gaussian(key & ref.MASK, numel, ref.gaussian_table())


def test_chunk_boundaries_do_not_change_values(monkeypatch: pytest.MonkeyPatch) -> None:
    key = noise.stream_key(5, 1, noise.ROLE_DENSE)
    whole_r, whole_g = noise.rademacher(key, 5000), noise.gaussian(key, 5000)
    monkeypatch.setattr(noise, "CHUNK_ELEMENTS", 77)  # not a multiple of 64 or 4: fields straddle chunks
    assert torch.equal(noise.rademacher(key, 5000), whole_r)
    assert torch.equal(noise.gaussian(key, 5000), whole_g)


def test_stream_keys_and_seeds_match_reference() -> None:
    for seed, index, role in [(0, 0, 0), (2**64 - 1, 7, 1), (42, 2**32 - 1, 2)]:
        assert noise.stream_key(seed, index, role) & ref.MASK == ref.stream_key(seed, index, role)
    assert seeds.member_seed(7, 3, 11) == ref.member_seed(7, 3, 11)


def test_gaussian_table_is_pinned_and_standard() -> None:
    table = noise.gaussian_table().double() / 2**noise.GAUSSIAN_SCALE_BITS
    assert table.numel() == 65536
    assert abs(table.mean().item()) < 1e-12  # symmetric quantiles
    assert abs(table.std().item() - 1.0) < 2e-3
    assert torch.all(table[1:] >= table[:-1])


def test_noise_statistics() -> None:
    key = noise.stream_key(1, 2, noise.ROLE_DENSE)
    g = noise.gaussian(key, 1 << 18).double() / 4096
    r = noise.rademacher(key, 1 << 18).double()
    assert abs(g.mean().item()) < 0.01 and abs(g.std().item() - 1) < 0.01
    assert abs(r.mean().item()) < 0.01 and set(r.unique().tolist()) == {-1.0, 1.0}


def test_distinct_roles_tensors_and_seeds_give_distinct_streams() -> None:
    streams = {
        tuple(noise.rademacher(noise.stream_key(seed, index, role), 256).tolist())
        for seed in (1, 2)
        for index in (0, 1)
        for role in (0, 1, 2)
    }
    assert len(streams) == 12


def test_lowrank_factors_shapes_and_values() -> None:
    a, b = noise.lowrank_factors(9, 4, out_features=6, in_features=5, rank=2)
    assert a.shape == (6, 2) and b.shape == (5, 2) and a.dtype == torch.int8
    assert a.flatten().tolist() == ref.rademacher(ref.stream_key(9, 4, 1), 12)
    assert b.flatten().tolist() == ref.rademacher(ref.stream_key(9, 4, 2), 10)


def test_population_factors_equal_each_seed_streamed_alone() -> None:
    seeds_ = [1, 2**64 - 1, 12345]
    for index, out_features, in_features, rank in [(0, 64, 64, 1), (5, 90, 37, 2), (11, 1, 130, 3)]:
        a, b = noise.population_factors(seeds_, index, out_features, in_features, rank)
        for row, seed in enumerate(seeds_):
            key_a, key_b = noise.stream_key(seed, index, noise.ROLE_LOWRANK_A), noise.stream_key(seed, index, noise.ROLE_LOWRANK_B)
            assert torch.equal(a[row].flatten(), noise.rademacher(key_a, out_features * rank))
            assert torch.equal(b[row].flatten(), noise.rademacher(key_b, in_features * rank))


def test_population_antithetic_pairs() -> None:
    members = seeds.population(3, 10, 6, antithetic=True)
    assert [m.sign for m in members] == [1, -1, 1, -1, 1, -1]
    assert members[0].seed == members[1].seed != members[2].seed
    assert len({m.seed for m in seeds.population(3, 10, 6, antithetic=False)}) == 6
    with pytest.raises(ValueError, match="even"):
        seeds.population(3, 10, 5, antithetic=True)


def test_noise_config_validation() -> None:
    with pytest.raises(ValueError, match="family"):
        noise.NoiseConfig(family="sparse")
    with pytest.raises(ValueError, match="distribution"):
        noise.NoiseConfig(distribution="uniform")


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_a_run_from_an_offset_is_that_slice_of_the_whole_stream(distribution: str, monkeypatch: pytest.MonkeyPatch) -> None:
    values = noise.noise_alphabet(distribution)
    whole = noise.dense_noise_map(9, [(4, 1000)], distribution, values)
    monkeypatch.setattr(noise, "CHUNK_ELEMENTS", 96)  # generation chunks that straddle the runs' ends
    for start, count in ((0, 1000), (1, 63), (63, 130), (257, 743), (999, 1)):
        assert torch.equal(noise.dense_noise_map(9, [(4, count)], distribution, values, start), whole[start : start + count])
    with pytest.raises(ValueError, match="one tensor"):
        noise.dense_noise_map(9, [(4, 10), (5, 10)], distribution, values, 3)
