"""The torchrunx log layout: trx-core's `LogPipeline` that writes files, the console and sinks.

Per run, in the launcher's ``logs`` folder: one file per agent (its own messages and its
local worker 0's output) and one per worker. Agent 0's log (so also global rank 0's
output) is rendered on the launcher's console as it happens. Records are written through
as they arrive, so a file holds every line that reached the launcher, even if the
launcher itself is killed afterwards.

`emit` runs in the launcher's loop, which also keeps the agents' heartbeats, so it never
waits for anything that can stall. The files are written there (local writes: a full disk
stops the run rather than lose lines unseen). The console and each sink are written by a
thread of their own through a bounded queue: a paused terminal or a hung sink loses lines
of its own view (a note says how many), never the run and never a line of the files.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TextIO

from trx_core import ConfigurationError, LogRecord, LogSettings, RunInfo, log_level_from_env
from trx_core.background import CLOSE_WAIT_S, BackgroundWriter
from trx_core.logs import console_writer

from .files import PRIVATE, RunFiles, create_folder, file_mode_from_env, folder_mode
from .processors import CONSOLE_CHAIN, JSONL_CHAIN, LEVELLED_STREAMS, TEXT_CHAIN, Processor, event_dict, render
from .sinks import registered_sinks, sink_writer

__all__ = ["LogLayout", "factory"]

Console = Literal["stdout", "stderr"]
FileFormat = Literal["text", "jsonl"]

_SUFFIXES: dict[str, str] = {"text": ".log", "jsonl": ".jsonl"}
_CHAINS: dict[str, list[Processor]] = {"text": TEXT_CHAIN, "jsonl": JSONL_CHAIN}


ConsoleLine = LogRecord | str  # a record, or a note of lines not shown


class LogLayout:
    """Writes each record of a run to its files, agent 0's records to the console, and every
    record to the user's sinks.

    `folder` None: no files; else files are created with permissions `file_mode`, and
    missing folders with the matching folder mode (see `trx_logging.files`). `console` names
    the ``sys`` stream (looked up at each record, so `contextlib.redirect_stdout` works);
    None: no console. Records of the ``logging`` and ``agent`` streams below `level` are
    dropped; captured output is always kept.
    """

    def __init__(
        self,
        folder: Path | None,
        *,
        console: Console | None = "stdout",
        file_format: FileFormat = "text",
        level: int = logging.INFO,
        sinks: Sequence[Callable[[LogRecord], object]] = (),
        file_mode: int = PRIVATE,
    ) -> None:
        self.folder = folder
        self._console = console
        self._suffix = _SUFFIXES[file_format]
        self._chain = _CHAINS[file_format]
        self._level = level
        self._sinks = tuple(sinks)
        self._file_mode = file_mode
        self._files: RunFiles | None = None
        self._host0 = ""
        self._console_writer: BackgroundWriter[tuple[TextIO, ConsoleLine]] | None = None
        self._sink_writers: list[BackgroundWriter[LogRecord | int]] = []
        self._console_stream: TextIO = sys.stderr  # the stream of the last console line: where a note goes

    @property
    def paths(self) -> list[Path]:
        """The files of the current (or last) run."""
        return self._files.paths() if self._files is not None else []

    def open(self, run: RunInfo) -> None:
        self._host0 = run.hostnames[0]
        if self.folder is not None:
            self._files = RunFiles.claim(
                self.folder, run.start, run.hostnames, run.workers_per_host, self._suffix, self._file_mode
            )
        if self._console is not None:
            self._console_writer = console_writer("torchrunx-console", _console_text, _size, self._console_note)
        self._sink_writers = [sink_writer(sink) for sink in self._sinks]

    def emit(self, record: LogRecord) -> None:
        if record.level < self._level and record.stream in LEVELLED_STREAMS:
            return
        if self._files is not None:
            line = (render(self._chain, event_dict(record)) + "\n").encode("utf-8", "backslashreplace")
            self._write(record.hostname, record.local_rank, line)
            if record.local_rank == 0:
                self._write(record.hostname, None, line)
        in_agent_log = record.local_rank is None or record.local_rank == 0
        if self._console_writer is not None and in_agent_log and record.hostname == self._host0:
            stream = getattr(sys, self._console or "stdout")
            if stream is not None:  # None: the program runs without it (`python x.py >&-`, some services)
                self._console_stream = stream
                self._console_writer.put((stream, record))
        for writer in self._sink_writers:
            writer.put(record)

    def _write(self, hostname: str, local_rank: int | None, data: bytes) -> None:
        assert self._files is not None
        try:
            _write(self._files.fd(hostname, local_rank), data)
        except OSError as e:
            # A full disk, a quota, a folder gone: the run stops rather than lose its logs unseen.
            path = self._files.path(hostname, local_rank)
            raise OSError(
                e.errno,
                f"{e.strerror}: cannot write the log file of the run {path} (the run was stopped; free space "
                "there, or choose another folder with Launcher.logs)",
                str(path),
            ) from e

    def _console_note(self, count: int) -> tuple[TextIO, ConsoleLine]:
        where = "the log files have every line" if self.folder is not None else "logs=None: they are in no file"
        return self._console_stream, f"[torchrunx] {count} lines not shown: the console did not keep up; {where}"

    def close(self) -> None:
        """Close the files, then give the console and the sinks `CLOSE_WAIT_S` in all to catch up."""
        try:
            if self._files is not None:
                self._files.close()
        finally:
            writers = [w for w in (self._console_writer, *self._sink_writers) if w is not None]
            self._console_writer, self._sink_writers = None, []
            deadline = time.monotonic() + CLOSE_WAIT_S
            for writer in writers:
                writer.close(max(0.1, deadline - time.monotonic()))


def _console_text(line: ConsoleLine) -> str:
    return line if isinstance(line, str) else render(CONSOLE_CHAIN, event_dict(line))


def _size(line: ConsoleLine) -> int:
    return len(line if isinstance(line, str) else line.message)


def factory(settings: LogSettings) -> LogLayout:
    """The ``default`` entry point of ``torchrunx.log_pipelines``: the layout `settings` ask for.

    The level comes from ``$TORCHRUNX_LOG_LEVEL`` (default INFO), the files' permissions from
    ``$TORCHRUNX_LOG_MODE`` (default 0600), the sinks from `add_sink`.
    """
    console, file_format = settings.console, settings.file_format
    if console not in ("stdout", "stderr", None):
        raise ConfigurationError(f"log_console={console!r} is not valid: use 'stdout', 'stderr' or None")
    if file_format not in _SUFFIXES:
        raise ConfigurationError(f"log_format={file_format!r} is not valid: use 'text' or 'jsonl'")
    folder = Path(settings.folder).expanduser() if settings.folder is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ConfigurationError(f"logs={str(folder)!r} is not a folder: pass a folder, or None for no log files")
    file_mode = file_mode_from_env()
    if folder is not None:  # now, before any process starts, rather than when the first file is created
        try:
            create_folder(folder, folder_mode(file_mode))
        except OSError as e:
            raise ConfigurationError(f"cannot create the log folder logs={str(folder)!r}: {e}") from e
        _check_writable(folder)
    return LogLayout(
        folder,
        console=console,
        file_format=file_format,
        level=log_level_from_env(),
        sinks=registered_sinks(),
        file_mode=file_mode,
    )


def _check_writable(folder: Path) -> None:
    """Create and remove a file in `folder`: permissions, a read-only filesystem, a full disk..."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".torchrunx-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigurationError(
            f"cannot write into the log folder logs={str(folder)!r}: {e.strerror}. Choose a folder this user can "
            "write to, or logs=None for no log files"
        ) from e


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
