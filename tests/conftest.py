"""Shared fixtures: a real (embedded) Redis server for the session, and unique job ids."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from swarmtune.embedded_redis import EmbeddedRedis

pytest_plugins = ["tests.support.tiny_models"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an embedded Redis server shared by the session: use a fresh `job_id` per test."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def job_id() -> str:
    """A job id no other test uses, so tests can share one Redis database."""
    return f"job-{uuid.uuid4().hex[:12]}"
