"""The log-pipeline interface: what the launcher does with the output of agents and workers.

Agents capture their workers' output at the file-descriptor level, cut it into lines and
stream them to the launcher as `LogRecord`s. The launcher hands every record to a
`LogPipeline`, in order per worker. trx-logging provides the full pipeline (per-agent and
per-worker files, console rendering); it is found through the ``torchrunx.log_pipelines``
entry-point group under the name ``default`` and built from the run's `LogSettings`.
Without it, `ConsolePipeline` prints agent 0's records to the console and writes no files.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, TextIO

from . import plugins
from .errors import ConfigurationError

__all__ = [
    "ConsolePipeline",
    "LogPipeline",
    "LogRecord",
    "LogSettings",
    "RunInfo",
    "log_level_from_env",
    "resolve_log_pipeline",
    "terminal_safe",
]

LOG_LEVEL_VAR = "TORCHRUNX_LOG_LEVEL"


def log_level_from_env() -> int:
    """``$TORCHRUNX_LOG_LEVEL`` as a number (a name such as ``DEBUG``, or a number); INFO if unset.

    Below this level, Python logging records of workers and the agents' own messages are
    dropped; captured output is always kept.
    """
    value = os.environ.get(LOG_LEVEL_VAR, "INFO").strip().upper()
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value)
    if not isinstance(level, int):
        raise ConfigurationError(
            f"{LOG_LEVEL_VAR}={value!r} is not a level: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    return level


@dataclass(frozen=True)
class LogSettings:
    """The launcher settings a log pipeline may use (see the `Launcher` fields of the same names)."""

    folder: Path | None
    console: Literal["stdout", "stderr"] | None = "stdout"
    file_format: Literal["text", "jsonl"] = "text"


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


_SGR = re.compile(r"\x1b\[[0-9;:]*m")  # colour and style: Select Graphic Rendition
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1


def terminal_safe(text: str) -> str:
    """`text` as it may be shown on a terminal: control characters other than tab and newline
    (a multi-line message, such as a traceback, keeps its lines), and so every escape sequence
    (cursor moves, screen clearing, window titles, clipboard writes...), are shown escaped
    (``\\x1b]0;title\\x07``), except colour and style sequences (SGR, ``ESC[...m``),
    which are kept and reset at the end of the line so that they colour nothing after it."""
    parts = _SGR.split(text)
    safe = [_CONTROL.sub(lambda m: repr(m[0])[1:-1], part) for part in parts]
    if len(parts) == 1:
        return safe[0]
    sgrs = _SGR.findall(text)
    return "".join(p + s for p, s in zip(safe, [*sgrs, ""], strict=True)) + "\x1b[0m"


class ConsolePipeline:
    """Prints agent 0's records (the agent's messages and its local worker 0) to a stream."""

    def __init__(self, stream: TextIO | None = None, console: Literal["stdout", "stderr"] | None = "stdout") -> None:
        self._stream = stream
        self._console = console
        self._host0 = ""

    def open(self, run: RunInfo) -> None:
        self._host0 = run.hostnames[0]

    def emit(self, record: LogRecord) -> None:
        if record.hostname != self._host0 or record.local_rank not in (None, 0) or self._console is None:
            return
        who = "agent" if record.rank is None else f"rank {record.rank}"
        stream = self._stream or getattr(sys, self._console)
        if stream is None:  # no standard stream at all (e.g. started with `>&-`)
            return
        stream.write(terminal_safe(f"[{record.hostname} {who}] {record.message}") + "\n")
        stream.flush()

    def close(self) -> None:
        pass


PipelineFactory = Callable[[LogSettings], LogPipeline]


def resolve_log_pipeline(settings: LogSettings) -> LogPipeline:
    """The installed ``default`` pipeline built for `settings`, else a `ConsolePipeline`."""
    factory: PipelineFactory | None = plugins.find(plugins.LOG_PIPELINES, "default")
    if factory is None:
        return ConsolePipeline(console=settings.console)
    return factory(settings)
