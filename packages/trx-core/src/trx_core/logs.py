"""The log-pipeline interface: what the launcher does with the output of agents and workers.

Agents capture their workers' output at the file-descriptor level, cut it into lines and
stream them to the launcher as `LogRecord`s. The launcher hands every record to a
`LogPipeline`, in order per worker. trx-logging provides the full pipeline (per-agent and
per-worker files, console rendering); it is found through the ``torchrunx.log_pipelines``
entry-point group under the name ``default`` and built from the run's `LogSettings`.
Without it, `ConsolePipeline` prints agent 0's records to the console and writes no files.

`emit` is called from the launcher's loop, which also keeps the agents' heartbeats: a
pipeline writes local files there, but hands anything that can stall (a terminal, the
network) to a `trx_core.background.BackgroundWriter`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, TextIO, TypeVar

from . import plugins
from .background import BackgroundWriter
from .errors import ConfigurationError

__all__ = [
    "CONSOLE_QUEUE",
    "ConsolePipeline",
    "LogPipeline",
    "LogRecord",
    "LogSettings",
    "RunInfo",
    "console_writer",
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
        """Handle one record, promptly: the launcher's loop, heartbeats included, waits for it."""
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


CONSOLE_QUEUE = 4 << 20
"""How much console output (about, in bytes) waits for a slow or paused terminal before lines
are dropped (the log files, if any, keep them)."""

L = TypeVar("L")


def console_writer(
    name: str, text: Callable[[L], str], size: Callable[[L], int], note: Callable[[int], tuple[TextIO, L]]
) -> BackgroundWriter[tuple[TextIO, L]]:
    """A `BackgroundWriter` of (stream, line) pairs for a console, on a thread named `name`.

    ``text(line)`` renders a line, on the writer's thread. The stream is the one the caller
    picks when it puts the line, so that `contextlib.redirect_stdout` around a run applies.
    ``size(line)`` is about its bytes, `CONSOLE_QUEUE` in all may wait. ``note(count)`` is
    the line shown for `count` lines that were not. A console that fails (a pipe closed by
    ``| head``) is reported once on stderr and written no more; the run goes on.
    """

    def write(batch: list[tuple[TextIO, L]]) -> None:
        # One write and one flush per stream and batch: the fewer system calls, the fewer
        # times the launcher's loop waits for the GIL back.
        start = 0
        for end in range(1, len(batch) + 1):
            if end == len(batch) or batch[end][0] is not batch[start][0]:
                stream = batch[start][0]
                stream.write("".join(text(line) + "\n" for _, line in batch[start:end]))
                stream.flush()
                start = end

    def report(error: Exception) -> None:
        with contextlib.suppress(Exception):
            print(f"torchrunx: the console failed ({error!r}); no more lines shown", file=sys.__stderr__)

    return BackgroundWriter(
        name,
        write,
        note,
        capacity=CONSOLE_QUEUE,
        size=lambda item: 256 + size(item[1]),  # 256: about what a queued line costs besides its text
        on_error=report,
        finish_at_exit=True,
    )


class ConsolePipeline:
    """Prints agent 0's records (the agent's messages and its local worker 0) to a stream.

    Printed by a thread of its own (a paused terminal does not stop the run): when the
    console falls more than `CONSOLE_QUEUE` behind, lines are dropped and a note says how many.
    """

    def __init__(self, stream: TextIO | None = None, console: Literal["stdout", "stderr"] | None = "stdout") -> None:
        self._stream = stream
        self._console = console
        self._host0 = ""
        self._writer: BackgroundWriter[tuple[TextIO, str]] | None = None
        self._last_stream: TextIO = sys.stderr  # where a note goes: the stream of the lines it replaces

    def open(self, run: RunInfo) -> None:
        self._host0 = run.hostnames[0]
        if self._console is not None:
            self._writer = console_writer("torchrunx-console", terminal_safe, len, self._note)

    def emit(self, record: LogRecord) -> None:
        if record.hostname != self._host0 or record.local_rank not in (None, 0) or self._writer is None:
            return
        stream = self._stream or getattr(sys, self._console or "stdout")
        if stream is None:  # no standard stream at all (e.g. started with `>&-`)
            return
        who = "agent" if record.rank is None else f"rank {record.rank}"
        self._last_stream = stream
        self._writer.put((stream, f"[{record.hostname} {who}] {record.message}"))

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _note(self, count: int) -> tuple[TextIO, str]:
        return self._last_stream, f"[torchrunx] {count} lines not shown: the console did not keep up"


PipelineFactory = Callable[[LogSettings], LogPipeline]


def resolve_log_pipeline(settings: LogSettings) -> LogPipeline:
    """The installed ``default`` pipeline built for `settings`, else a `ConsolePipeline`."""
    factory: PipelineFactory | None = plugins.find(plugins.LOG_PIPELINES, "default")
    if factory is None:
        return ConsolePipeline(console=settings.console)
    return factory(settings)
