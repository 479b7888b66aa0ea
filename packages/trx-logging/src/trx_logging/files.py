"""The log files of one run: their names, and claiming them without ever sharing one.

Names: ``<start>_<host>.log`` for each agent, ``<start>_<host>_<local rank>.log`` for each
worker, where ``<start>`` is the run's start in ISO 8601 with microseconds (so names sort by
time). Every file is created with ``O_EXCL``: if another run already owns one of the names
(it started in the same microsecond), this run gives back what it created and tries the
next microsecond, so two runs never write into the same file.

Logs hold whatever the workers print (tokens, paths, data), so they are private: files
0600 and the folders torchrunx creates 0700, whatever the umask. ``$TORCHRUNX_LOG_MODE``
(e.g. ``0640``) sets the files' mode, and the folders' follows (read adds search: ``0750``);
a folder that exists already keeps its mode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from trx_core import ConfigurationError

__all__ = ["LOG_MODE_VAR", "RunFiles", "create_folder", "file_mode_from_env"]

LOG_MODE_VAR = "TORCHRUNX_LOG_MODE"
PRIVATE = 0o600

FileKey = tuple[str, "int | None"]  # (hostname, local rank); None: the agent's file

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
_MAX_TRIES = 10_000


class RunFiles:
    """The open files of one run, by (hostname, local rank). Owns the descriptors: `close()`."""

    def __init__(self, folder: Path, stem: str, fds: dict[FileKey, int], suffix: str, mode: int) -> None:
        self.folder = folder
        self.stem = stem
        self._fds = fds
        self._keys = list(fds)  # every file of the run, also once closed
        self._suffix = suffix
        self._mode = mode

    @classmethod
    def claim(
        cls,
        folder: Path,
        start: datetime,
        hostnames: Sequence[str],
        workers_per_host: Sequence[int],
        suffix: str,
        mode: int = PRIVATE,
    ) -> RunFiles:
        """Create every file of a run in `folder` (created if needed), under the first free
        start-time stem; files with permissions `mode`, new folders with `folder_mode(mode)`."""
        create_folder(folder, folder_mode(mode))
        keys: list[FileKey] = []
        for host, count in zip(hostnames, workers_per_host, strict=True):
            keys.append((host, None))
            keys.extend((host, local_rank) for local_rank in range(count))
        _refuse_shared_names(keys, suffix)
        for bump in range(_MAX_TRIES):
            stem = (start + timedelta(microseconds=bump)).isoformat(timespec="microseconds")
            fds = _create_all(folder, [(key, file_name(stem, *key, suffix)) for key in keys], mode)
            if fds is not None:
                return cls(folder, stem, fds, suffix, mode)
        raise FileExistsError(f"no free log file names in {folder} for a run started at {start}")

    def fd(self, hostname: str, local_rank: int | None) -> int:
        """The descriptor of a file of this run (created now if the run grew)."""
        key = (hostname, local_rank)
        fd = self._fds.get(key)
        if fd is None:
            path = self.folder / file_name(self.stem, hostname, local_rank, self._suffix)
            fd = self._fds[key] = _open(path, _FLAGS & ~os.O_EXCL, self._mode)
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


def file_mode_from_env() -> int:
    """The log files' permissions: ``$TORCHRUNX_LOG_MODE`` (octal, e.g. ``0640``), else 0600."""
    value = os.environ.get(LOG_MODE_VAR, "").strip()
    if not value:
        return PRIVATE
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & PRIVATE != PRIVATE:
        raise ConfigurationError(
            f"{LOG_MODE_VAR}={value!r} is not a mode for log files: use octal permissions that let the owner read "
            "and write, e.g. 0600 (the default) or 0640"
        )
    return mode


def folder_mode(file_mode: int) -> int:
    """The mode of a folder of files with `file_mode`: who may read the files may list the folder."""
    return file_mode | (file_mode & 0o444) >> 2


def create_folder(folder: Path, mode: int) -> None:
    """Create `folder` and its missing parents with exactly `mode` (the umask does not apply);
    folders that exist keep theirs."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else (another run): theirs
        os.chmod(path, mode)


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


def _open(path: Path, flags: int, mode: int) -> int:
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`: os.open's is masked by the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_all(folder: Path, named: list[tuple[FileKey, str]], mode: int) -> dict[FileKey, int] | None:
    # Always in the same (sorted) order, so of two runs racing for the same names, the one
    # that loses the first contested name backs off having taken none of the other's.
    fds: dict[FileKey, int] = {}
    try:
        for key, name in sorted(named, key=lambda kn: kn[1]):
            fds[key] = _open(folder / name, _FLAGS, mode)
    except FileExistsError:
        for key, fd in fds.items():
            os.close(fd)
            os.unlink(folder / dict(named)[key])
        return None
    return fds
