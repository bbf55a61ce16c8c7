"""Fixtures of the multi-process tests (load with `pytest_plugins = ("tests.e2e_fixtures",)`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import ROOT, Cluster, Clusters, child_env
from tests.zygote import Zygote


@pytest.fixture(scope="session")
def zygote() -> Iterator[Zygote]:
    """One fork server for the whole session."""
    server = Zygote(ROOT, child_env())
    yield server
    server.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (character tokenizer), built once per session."""
    from swarmtune.modelbuild import build_random_model

    return build_random_model(tmp_path_factory.mktemp("e2e-model"), hidden=32, layers=1, heads=2, intermediate=64)


@pytest.fixture
def clusters(tmp_path: Path, zygote: Zygote, model_dir: Path) -> Iterator[Clusters]:
    """make(name, redis_url, spec) -> a Cluster; every process and proxy it started is stopped afterwards."""
    started: list[Cluster] = []

    def make(name: str, redis_url: str, spec: str) -> Cluster:
        cluster = Cluster(tmp_path / name, redis_url, model_dir, spec, zygote)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.close()
