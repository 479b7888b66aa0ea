"""User sinks: more places for every record of every run, besides the files and the console.

A sink is either a callable that receives each `trx_core.LogRecord` (host, rank, local
rank, stream, level, message, logger), or a `logging.Handler` that receives each record as
a `logging.LogRecord` with the extra attributes ``hostname``, ``rank``, ``local_rank`` and
``stream``. Sinks are called in the launcher process, in order per worker, each on a thread
of its own (``torchrunx-sink ...``) fed by a bounded queue, so that a slow or hung sink never
holds the run up: when one falls `SINK_QUEUE` (about, in bytes) behind, records are dropped
for it, and a line on stderr says how many when it catches up (the log files keep them). A
sink that raises is reported on stderr and gets no more records of that run; the run goes on.

Records below ``$TORCHRUNX_LOG_LEVEL`` (Python logging records and the agent's messages)
never reach a sink; captured output (``stream`` ``stdout`` / ``stderr``) always does.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable
from types import TracebackType

from trx_core import LogRecord
from trx_core.background import BackgroundWriter

__all__ = ["SINK_QUEUE", "Sink", "SinkRegistration", "add_sink", "registered_sinks", "sink_writer"]

SINK_QUEUE = 4 << 20

Sink = Callable[[LogRecord], object] | logging.Handler

_lock = threading.Lock()
_sinks: list[Sink] = []


class SinkRegistration:
    """Returned by `add_sink`: `remove()` it, or use it as a context manager."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def remove(self) -> None:
        """Runs started from now on no longer send records to the sink."""
        with _lock:
            if self.sink in _sinks:
                _sinks.remove(self.sink)

    def __enter__(self) -> SinkRegistration:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def add_sink(sink: Sink) -> SinkRegistration:
    """Send every record of the runs started from now on to `sink` too, until removed.

    A callable receives each `trx_core.LogRecord`; for example, keep rank 1's warnings::

        warnings_of_rank_1 = []

        def keep(record: LogRecord) -> None:
            if record.rank == 1 and record.level >= logging.WARNING:
                warnings_of_rank_1.append(record.message)

        with add_sink(keep):  # removed again at the end of the block
            launcher.run(train)

    (``add_sink`` is also ``torchrunx.add_sink``.)

    A `logging.Handler` receives each record as a `logging.LogRecord` (level and logger name
    kept, captured output at INFO) with the attributes ``hostname``, ``rank`` (None for the
    agent), ``local_rank`` and ``stream``, so a formatter can show them::

        handler = logging.FileHandler("all_ranks.log")
        handler.setFormatter(logging.Formatter("%(hostname)s rank %(rank)s: %(message)s"))
        registration = add_sink(handler)
        ...
        registration.remove()
    """
    if not (callable(sink) or isinstance(sink, logging.Handler)):
        raise TypeError(f"a sink is a callable or a logging.Handler, not {type(sink).__qualname__}")
    with _lock:
        _sinks.append(sink)
    return SinkRegistration(sink)


def registered_sinks() -> list[Callable[[LogRecord], object]]:
    """The sinks registered now, each as a callable taking a `LogRecord`."""
    with _lock:
        return [_handler_sink(s) if isinstance(s, logging.Handler) else s for s in _sinks]


def _handler_sink(handler: logging.Handler) -> Callable[[LogRecord], object]:
    def emit(record: LogRecord) -> None:
        name = record.logger or ("torchrunx.agent" if record.local_rank is None else "torchrunx.worker")
        converted = logging.LogRecord(name, record.level, "", 0, record.message, None, None)
        converted.created = record.time
        converted.msecs = (record.time % 1) * 1000
        converted.hostname = record.hostname
        converted.rank = record.rank
        converted.local_rank = record.local_rank
        converted.stream = record.stream
        handler.handle(converted)

    return emit


def sink_writer(sink: Callable[[LogRecord], object]) -> BackgroundWriter[LogRecord | int]:
    """A thread that calls `sink` with each record put, and reports on stderr the records it
    dropped (an int in the queue: how many) and a sink that raised."""
    name = getattr(sink, "__qualname__", type(sink).__qualname__)

    def write(batch: list[LogRecord | int]) -> None:
        for item in batch:
            if isinstance(item, LogRecord):
                sink(item)
            else:
                print(
                    f"torchrunx: log sink {sink!r} did not keep up: {item} records were not sent to it "
                    "(the log files, if any, have them)",
                    file=sys.stderr,
                )

    def report(error: Exception) -> None:
        # Like a failing logging.Handler: said on stderr, and the run goes on (a broken metrics
        # sink must not kill a training run); dropped for the rest of the run, or a flood of
        # records would print a flood of tracebacks.
        print(f"torchrunx: log sink {sink!r} failed and gets no more records of this run:", file=sys.stderr)
        traceback.print_exception(type(error), error, error.__traceback__)

    return BackgroundWriter(
        f"torchrunx-sink {name}",
        write,
        lambda count: count,
        capacity=SINK_QUEUE,
        size=lambda item: 256 + len(item.message) if isinstance(item, LogRecord) else 0,
        on_error=report,
    )
