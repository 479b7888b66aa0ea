"""The log files of one run: their names, and claiming them without ever sharing one.

Names: ``<start>_<host>.log`` for each agent, ``<start>_<host>_<local rank>.log`` for each
worker, where ``<start>`` is the run's start in ISO 8601 with microseconds (so names sort by
time). Every file is created with ``O_EXCL``: if another run already owns one of the names
(it started in the same microsecond), this run gives back what it created and tries the
next microsecond, so two runs never write into the same file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from trx_core import ConfigurationError

__all__ = ["RunFiles"]

FileKey = tuple[str, "int | None"]  # (hostname, local rank); None: the agent's file

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
_MAX_TRIES = 10_000


class RunFiles:
    """The open files of one run, by (hostname, local rank). Owns the descriptors: `close()`."""

    def __init__(self, folder: Path, stem: str, fds: dict[FileKey, int], suffix: str) -> None:
        self.folder = folder
        self.stem = stem
        self._fds = fds
        self._keys = list(fds)  # every file of the run, also once closed
        self._suffix = suffix

    @classmethod
    def claim(
        cls, folder: Path, start: datetime, hostnames: Sequence[str], workers_per_host: Sequence[int], suffix: str
    ) -> RunFiles:
        """Create every file of a run in `folder`, under the first free start-time stem."""
        folder.mkdir(parents=True, exist_ok=True)
        keys: list[FileKey] = []
        for host, count in zip(hostnames, workers_per_host, strict=True):
            keys.append((host, None))
            keys.extend((host, local_rank) for local_rank in range(count))
        _refuse_shared_names(keys, suffix)
        for bump in range(_MAX_TRIES):
            stem = (start + timedelta(microseconds=bump)).isoformat(timespec="microseconds")
            fds = _create_all(folder, [(key, file_name(stem, *key, suffix)) for key in keys])
            if fds is not None:
                return cls(folder, stem, fds, suffix)
        raise FileExistsError(f"no free log file names in {folder} for a run started at {start}")

    def fd(self, hostname: str, local_rank: int | None) -> int:
        """The descriptor of a file of this run (created now if the run grew)."""
        key = (hostname, local_rank)
        fd = self._fds.get(key)
        if fd is None:
            path = self.folder / file_name(self.stem, hostname, local_rank, self._suffix)
            fd = self._fds[key] = os.open(path, _FLAGS & ~os.O_EXCL, 0o644)
            if key not in self._keys:
                self._keys.append(key)
        return fd

    def path(self, hostname: str, local_rank: int | None) -> Path:
        """The path of one file of this run."""
        return self.folder / file_name(self.stem, hostname, local_rank, self._suffix)

    def paths(self) -> list[Path]:
        """Every file of this run."""
        return [self.folder / file_name(self.stem, host, rank, self._suffix) for host, rank in self._keys]

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def file_name(stem: str, hostname: str, local_rank: int | None, suffix: str) -> str:
    """``<stem>_<hostname>[_<local rank>]<suffix>``, with path separators in the hostname replaced."""
    host = hostname.replace(os.sep, "_")
    return f"{stem}_{host}{suffix}" if local_rank is None else f"{stem}_{host}_{local_rank}{suffix}"


def _refuse_shared_names(keys: list[FileKey], suffix: str) -> None:
    """Two files of a run with one name (hosts ``node`` and ``node_0``: the first's worker 0 and
    the second's agent) would mix two logs in one file: refused, naming the hosts."""
    owners: dict[str, FileKey] = {}
    for key in keys:
        name = file_name("", *key, suffix)
        other = owners.setdefault(name, key)
        if other != key:
            raise ConfigurationError(
                f"hosts {other[0]!r} and {key[0]!r} would write into the same log file (*{name}): rename one of "
                "them (e.g. with a Host alias in the ssh config), or set logs=None"
            )


def _create_all(folder: Path, named: list[tuple[FileKey, str]]) -> dict[FileKey, int] | None:
    # Always in the same (sorted) order, so of two runs racing for the same names, the one
    # that loses the first contested name backs off having taken none of the other's.
    fds: dict[FileKey, int] = {}
    try:
        for key, name in sorted(named, key=lambda kn: kn[1]):
            fds[key] = os.open(folder / name, _FLAGS, 0o644)
    except FileExistsError:
        for key, fd in fds.items():
            os.close(fd)
            os.unlink(folder / dict(named)[key])
        return None
    return fds
