"""User sinks: more places for every record of every run, besides the files and the console.

A sink is either a callable that receives each `trx_core.LogRecord` (host, rank, local
rank, stream, level, message, logger), or a `logging.Handler` that receives each record as
a `logging.LogRecord` with the extra attributes ``hostname``, ``rank``, ``local_rank`` and
``stream``. Sinks are called in the launcher process, in order per worker; a slow sink slows
the run's output down (nothing is dropped). A sink that raises is reported on stderr and
gets no more records of that run; the run goes on.

Records below ``$TORCHRUNX_LOG_LEVEL`` (Python logging records and the agent's messages)
never reach a sink; captured output (``stream`` ``stdout`` / ``stderr``) always does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from trx_core import LogRecord

__all__ = ["Sink", "SinkRegistration", "add_sink", "registered_sinks"]

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
