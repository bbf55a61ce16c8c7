"""Where models live: the cache root of built models, and the error for a spec that names nothing loadable."""

from __future__ import annotations

import os
from pathlib import Path


class ModelResolutionError(ValueError):
    """A model spec that names nothing loadable; the message says what to pass instead."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where swarmtune caches built models: the argument, `$SWARMTUNE_CACHE`, or ~/.cache/swarmtune."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SWARMTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swarmtune"

