#!/usr/bin/env python3
"""The images' entrypoint: `swarmtune ARGS...`, creating a worker's key file first when it is missing.

With SWARMTUNE_WORKER_KEYGEN=1 (set in the worker images), `worker --key FILE` creates FILE when it is
missing, so every replica of `--scale worker=N`, and a worker joined with one `docker run`, has its own
identity; the public key is printed once. Everything else is `swarmtune` itself: `docker run IMAGE audit
--help` is `swarmtune audit --help`, and $SWARMTUNE_REDIS_URL is read by swarmtune.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _option_value(args: list[str], option: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _ensure_worker_key(path: Path) -> None:
    if path.exists():
        return
    from swarmtune import identity

    path.parent.mkdir(parents=True, exist_ok=True)
    key = identity.generate_key()
    identity.save_private_key(key, path)
    print(f"swarmtune-container: created worker key {path}: public key {identity.public_key_bytes(key).hex()}", file=sys.stderr, flush=True)


def main() -> None:
    from swarmtune.cli import entry

    args = sys.argv[1:]
    if args[:1] == ["worker"] and os.environ.get("SWARMTUNE_WORKER_KEYGEN") == "1":
        key = _option_value(args, "--key")
        if key:
            _ensure_worker_key(Path(key))
    entry()  # exits with swarmtune's status


if __name__ == "__main__":
    main()
