"""The command line takes the Redis URL from $SWARMTUNE_REDIS_URL only where no ledger source was named."""

from __future__ import annotations

import argparse

import pytest

from swarmtune.cli import REDIS_URL_ENV, build_parser, redis_url_from_env

URL = "redis://auditor:secret@redis:6379/0"


def parsed(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)  # the parser reads the environment as it is built
    redis_url_from_env(args)
    return args


@pytest.mark.parametrize(
    "argv",
    [["ledger", "export", "--out", "x.ledger"], ["audit"], ["status"], ["coordinator", "--job", "job.toml"]],
)
def test_commands_without_a_source_take_the_environment_url(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_URL_ENV, URL)
    assert parsed(argv).redis_url == URL


@pytest.mark.parametrize(
    "argv",
    [
        ["ledger", "export", "--out", "x.ledger", "--data-dir", "/tmp/redis"],
        ["audit", "--ledger", "x.ledger"],
        ["status", "--coordinator", "127.0.0.1:7070"],
        ["coordinator", "--job", "job.toml", "--redis-url", "redis://other:6379/0"],
    ],
)
def test_a_named_source_wins_over_the_environment(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_URL_ENV, URL)
    assert parsed(argv).redis_url != URL


def test_without_the_variable_a_source_is_still_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    for argv in (["audit"], ["status"]):
        with pytest.raises(SystemExit):
            parsed(argv)
    assert parsed(["ledger", "export", "--out", "x.ledger"]).redis_url is None  # the embedded server
    assert not hasattr(parsed(["worker", "--coordinator", "h:1", "--key", "k"]), "redis_url")


def test_metrics_host_defaults_to_loopback() -> None:
    assert parsed(["coordinator", "--job", "job.toml"]).metrics_host == "127.0.0.1"
    assert parsed(["coordinator", "--job", "job.toml", "--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"
