"""The one way trx-core finds what other packages provide: Python entry points.

Groups (each entry point's object is called with the arguments its interface names):

- ``torchrunx.executors``: executor factories, called with an `ExecutorSettings`;
- ``torchrunx.log_pipelines``: log pipeline factories (``default``), called with a `LogSettings`;
- ``torchrunx.host_discovery``: host discovery classes (e.g. ``slurm``), called with no arguments.

An embedding program may also register objects in this process with `register`, which take
precedence over installed entry points of the same group and name.
"""

from __future__ import annotations

import functools
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["EXECUTORS", "HOST_DISCOVERY", "LOG_PIPELINES", "find", "find_all", "names", "register"]

EXECUTORS = "torchrunx.executors"
LOG_PIPELINES = "torchrunx.log_pipelines"
HOST_DISCOVERY = "torchrunx.host_discovery"

_registered: dict[tuple[str, str], Any] = {}


def _installed(group: str) -> dict[str, EntryPoint]:
    return _scan(group, tuple(sys.path))


@functools.lru_cache(maxsize=32)
def _scan(group: str, path: tuple[str, ...]) -> dict[str, EntryPoint]:
    # Scanning the installed distributions costs tens of milliseconds: once per group, for as
    # long as sys.path (where distributions are found) stays the same.
    return {ep.name: ep for ep in entry_points(group=group)}


def register(group: str, name: str, obj: Any) -> None:
    """Make `obj` the plugin `name` of `group` in this process."""
    _registered[(group, name)] = obj


def names(group: str) -> list[str]:
    """Every plugin name of `group`: registered in this process or installed."""
    return sorted({n for g, n in _registered if g == group} | set(_installed(group)))


def find(group: str, name: str) -> Any | None:
    """The plugin `name` of `group` (loaded), or None if there is none."""
    if (group, name) in _registered:
        return _registered[(group, name)]
    entry = _installed(group).get(name)
    return entry.load() if entry is not None else None


def find_all(group: str) -> list[Any]:
    """Every plugin of `group`, loaded, in name order."""
    return [find(group, name) for name in names(group)]
