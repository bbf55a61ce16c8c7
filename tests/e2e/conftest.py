"""Fixtures of the multi-process tests: one fork server per session, and clusters stopped after each test."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from swarmtune.demo.cluster import child_env
from tests.support.cluster import Cluster, Clusters
from tests.support.processes import ROOT
from tests.support.zygote import Zygote


@pytest.fixture(scope="session")
def zygote() -> Iterator[Zygote]:
    """One fork server for the whole session."""
    server = Zygote(ROOT, child_env())
    yield server
    server.close()


@pytest.fixture
def clusters(tmp_path: Path, zygote: Zygote, model_dir: Path) -> Iterator[Clusters]:
    """make(name, redis_url, spec) -> a Cluster on `model_dir`; every process and proxy it started is stopped afterwards."""
    started: list[Cluster] = []

    def make(name: str, redis_url: str, spec: str) -> Cluster:
        cluster = Cluster(tmp_path / name, redis_url, model_dir, spec, zygote)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.close()
