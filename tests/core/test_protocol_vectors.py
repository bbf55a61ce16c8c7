"""The golden test vectors of docs/PROTOCOL.md §7, against the torch code and the integer reference."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmtune import entries, noise, seeds, shaping, state, update
from swarmtune.assignment import Candidate, assign, drawn
from tests.support import spec_reference as ref

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
MASK = (1 << 64) - 1


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    section = PROTOCOL.read_text().split("## 7. Test vectors", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert block, "PROTOCOL.md §7 must hold a ```json block of test vectors"
    return json.loads(block.group(1))


def test_seeds_keys_and_blocks(vectors: dict[str, Any]) -> None:
    for v in vectors["member_seed"]:
        assert seeds.member_seed(v["job_seed"], v["iteration"], v["noise_index"]) == v["seed"]
        assert ref.member_seed(v["job_seed"], v["iteration"], v["noise_index"]) == v["seed"]
    for v in vectors["stream_key"]:
        assert noise.stream_key(v["seed"], v["tensor_index"], v["role"]) & MASK == v["key"]
    for v in vectors["block"]:
        signed = v["key"] - (1 << 64) if v["key"] >= 1 << 63 else v["key"]
        assert int(noise.hash_blocks(signed, v["counter"], 1)[0]) & MASK == v["value"]
        assert ref.block(v["key"], v["counter"]) == v["value"]


def test_noise_values(vectors: dict[str, Any]) -> None:
    rad, gau = vectors["rademacher_first_16"], vectors["gaussian_first_8"]
    key = rad["key"] - (1 << 64) if rad["key"] >= 1 << 63 else rad["key"]
    assert noise.rademacher(key, 16).tolist() == rad["values"] == ref.rademacher(rad["key"], 16)
    assert noise.gaussian(key, 8).tolist() == gau["values"] == ref.gaussian(gau["key"], 8, ref.gaussian_table())
    assert vectors["gaussian_table_sha256"] == noise.GAUSSIAN_TABLE_SHA256


def tiny_state(vectors: dict[str, Any], treatments: tuple[str, str]) -> state.MasterState:
    tensors = vectors["tiny_state"]["tensors"]
    specs = tuple(
        entries.TensorSpec(t["name"], tuple(t["shape"]), t["exponent"], treatment) for t, treatment in zip(tensors, treatments)
    )
    return state.MasterState(specs, tuple(torch.tensor(t["q"], dtype=state.Q_DTYPE).view(t["shape"]) for t in tensors))


def reference_tensors(vectors: dict[str, Any], qs: list[list[int]]) -> list[tuple[str, tuple[int, ...], int, list[int]]]:
    return [(t["name"], tuple(t["shape"]), t["exponent"], q) for t, q in zip(vectors["tiny_state"]["tensors"], qs)]


def test_state_hash(vectors: dict[str, Any]) -> None:
    expected = vectors["tiny_state"]["sha256"]
    assert state.state_hash(tiny_state(vectors, ("dense", "dense"))).hex() == expected
    qs = [t["q"] for t in vectors["tiny_state"]["tensors"]]
    assert ref.state_hash(reference_tensors(vectors, qs)).hex() == expected


def test_coefficients(vectors: dict[str, Any]) -> None:
    v = vectors["coefficients"]
    assert shaping.coefficients(v["rewards"], "zscore", v["alpha"]) == v["zscore"]
    assert shaping.coefficients(v["rewards"], "centered_rank", v["alpha"]) == v["centered_rank"]


@pytest.mark.parametrize(
    "name, treatments, config",
    [
        ("dense_gaussian_update", ("dense", "dense"), noise.NoiseConfig("dense", "gaussian")),
        ("lowrank_rank2_update", ("lowrank", "frozen"), noise.NoiseConfig("lowrank", rank=2)),
    ],
)
def test_updates(vectors: dict[str, Any], name: str, treatments: tuple[str, str], config: noise.NoiseConfig) -> None:
    v = vectors[name]
    current = tiny_state(vectors, treatments)
    members = seeds.population(v["job_seed"], v["iteration"], v["population"], v["antithetic"])
    update.apply_iteration_(current, update.IterationUpdate(members, tuple(v["coefficients"])), config)
    assert [t.flatten().tolist() for t in current.q] == v["q_after"]
    assert state.state_hash(current).hex() == v["sha256_after"]
    weights = update.seed_weights(members, tuple(v["coefficients"]))
    expected = []
    for index, (spec, t) in enumerate(zip(current.specs, vectors["tiny_state"]["tensors"])):
        if spec.treatment == "lowrank":
            delta = ref.lowrank_delta(weights, index, *spec.shape, config.rank, spec.exponent)
        elif spec.treatment == "dense":
            delta = ref.dense_delta(weights, index, spec.numel, config.distribution, spec.exponent)
        else:
            delta = [0] * spec.numel
        expected.append(ref.apply_update(t["q"], delta))
    assert expected == v["q_after"]
    assert ref.state_hash(reference_tensors(vectors, expected)).hex() == v["sha256_after"]


def test_opening_blocks(vectors: dict[str, Any]) -> None:
    v = vectors["opening_blocks"]
    pool = [Candidate(bytes.fromhex(c["key"]), c["key"], c["capacity"]) for c in v["candidates"]]
    draw = bytes.fromhex(v["draw"])
    assert [c.key.hex() for c in drawn(pool, draw)] == v["order"]
    plan = assign(range(v["population"]), pool, v["redundancy"], draw)
    assert [list(plan[bytes.fromhex(key)]) for key in v["order"]] == v["assigned"]
