"""Backends by name: each name's module is imported only when a worker asks for it."""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Mapping, cast

from swarmtune.backends.base import BackendError, BackendFactory

# Backend names -> the module whose `build` is that backend's BackendFactory. Imported on use: a
# backend's own dependencies (a GPU runtime, say) are needed only where it runs.
BACKENDS: Mapping[str, str] = MappingProxyType({"hf": "swarmtune.backends.hf", "vllm": "swarmtune.backends.vllm"})


def backend_factory(name: str) -> BackendFactory:
    """The factory of the backend `name`; a BackendError naming the known backends for any other."""
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise BackendError(f"unknown backend {name!r}: use one of {known}")
    return cast(BackendFactory, importlib.import_module(BACKENDS[name]).build)
