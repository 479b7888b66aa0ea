"""The log-pipeline interface: what the launcher does with the output of agents and workers.

Agents capture their workers' output at the file-descriptor level, cut it into lines and
stream them to the launcher as `LogRecord`s. The launcher hands every record to a
`LogPipeline`, in order per worker. trx-logging provides the full pipeline (per-agent and
per-worker files, console rendering); it is found through the ``torchrunx.log_pipelines``
entry-point group under the name ``default``. Without it, `ConsolePipeline` prints agent
0's records to standard output and writes no files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from .launcher import Launcher

__all__ = ["ConsolePipeline", "LogPipeline", "LogRecord", "RunInfo", "resolve_log_pipeline"]

ENTRY_POINT_GROUP = "torchrunx.log_pipelines"


@dataclass(frozen=True)
class LogRecord:
    """One line of output (or one agent message) from a host.

    ``local_rank`` and ``rank`` are None for the agent's own messages. ``stream`` is
    ``"stdout"`` or ``"stderr"`` for captured output, ``"logging"`` for a Python logging
    record of a worker (``level`` and ``logger`` are then its own), ``"agent"`` for the agent.
    """

    time: float
    hostname: str
    local_rank: int | None
    rank: int | None
    stream: str
    level: int
    message: str
    logger: str = ""


@dataclass(frozen=True)
class RunInfo:
    """What a pipeline needs to know about a run before its first record."""

    start: datetime
    hostnames: Sequence[str]
    workers_per_host: Sequence[int]


class LogPipeline(Protocol):
    """Receives every record of a run, in the launcher process."""

    def open(self, run: RunInfo) -> None:
        """Called once before the first record."""
        ...

    def emit(self, record: LogRecord) -> None:
        """Handle one record. Blocking here slows the run's output down; nothing is dropped."""
        ...

    def close(self) -> None:
        """Called once after the last record, also when the run fails."""
        ...


class ConsolePipeline:
    """Prints agent 0's records (the agent's messages and its local worker 0) to a stream."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._host0 = ""

    def open(self, run: RunInfo) -> None:
        self._host0 = run.hostnames[0]

    def emit(self, record: LogRecord) -> None:
        if record.hostname != self._host0 or record.local_rank not in (None, 0):
            return
        who = "agent" if record.rank is None else f"rank {record.rank}"
        stream = self._stream or sys.stdout
        stream.write(f"[{record.hostname} {who}] {record.message}\n")
        stream.flush()

    def close(self) -> None:
        pass


PipelineFactory = Callable[["Launcher"], LogPipeline]


def resolve_log_pipeline(launcher: Launcher) -> LogPipeline:
    """The installed ``default`` pipeline for `launcher`, else a `ConsolePipeline`."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == "default":
            factory: PipelineFactory = ep.load()
            return factory(launcher)
    return ConsolePipeline()
