"""Records as structlog event dicts, and the processor chains that render them.

A `trx_core.LogRecord` becomes an event dict with the keys ``time``, ``host``, ``rank``,
``local_rank``, ``stream``, ``level``, ``logger`` and ``event`` (the message). Each chain is
a plain list of structlog processors ending in a renderer; `render` runs one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from structlog.dev import Column, ColumnFormatter, ConsoleRenderer
from structlog.processors import EventRenamer, JSONRenderer
from structlog.typing import EventDict, WrappedLogger

from trx_core import LogRecord
from trx_core.logs import terminal_safe

__all__ = ["CONSOLE_CHAIN", "JSONL_CHAIN", "TEXT_CHAIN", "event_dict", "render"]

Processor = Callable[[WrappedLogger, str, EventDict], Any]

# Streams whose records carry a meaningful level (the others are captured output).
LEVELLED_STREAMS = frozenset({"logging", "agent"})


def event_dict(record: LogRecord) -> EventDict:
    """The structured form of a record."""
    return {
        "time": record.time,
        "host": record.hostname,
        "rank": record.rank,
        "local_rank": record.local_rank,
        "stream": record.stream,
        "level": record.level,
        "logger": record.logger,
        "event": record.message,
    }


def render(chain: Sequence[Processor], event: EventDict) -> str:
    """Run `event` through `chain`; the last processor returns the rendered string."""
    result: Any = event
    for processor in chain:
        result = processor(None, "", result)
    return str(result)


# -- processors -------------------------------------------------------------------------


def iso_time(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """``time``: seconds since the epoch -> local ISO 8601 with microseconds."""
    event["time"] = datetime.fromtimestamp(event["time"]).isoformat(timespec="microseconds")
    return event


def level_name(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """``level``: a number -> its lower-case name (``info``, ``warning``...)."""
    event["level"] = logging.getLevelName(event["level"]).lower()
    return event


def who_and_source(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Columns for people: ``who`` (agent, or rank and local rank) and ``source`` (stream or level)."""
    rank, local_rank = event.pop("rank"), event.pop("local_rank")
    who = "agent" if local_rank is None else f"rank {rank} local {local_rank}"
    event["who"] = f"{event.pop('host')} {who}"
    stream, level, name = event.pop("stream"), event.pop("level"), event.pop("logger")
    event["source"] = level.upper() if stream in LEVELLED_STREAMS else stream
    if name and name != "root":
        event["event"] = f"{name}: {event['event']}"
    return event


def console_prefix(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """The short prefix of a console line: ``[host rank N]`` or ``[host agent]``, plus the level
    of a logging record."""
    rank = event.pop("rank")
    who = "agent" if rank is None else f"rank {rank}"
    prefix = f"[{event.pop('host')} {who}]"
    if event.pop("stream") == "logging":
        prefix += f" {logging.getLevelName(event['level'])}:"
    return {"prefix": prefix, "event": event["event"]}


def safe_for_terminal(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Every value shown as `trx_core.logs.terminal_safe` makes it: a worker's escape sequences
    (window titles, clipboard writes, screen clearing) do not act on the launcher's terminal."""
    return {key: terminal_safe(value) if isinstance(value, str) else value for key, value in event.items()}


def _plain(width: int = 0) -> ColumnFormatter:
    def column(key: str, value: object) -> str:
        return f"{value!s:<{width}}"

    return column


def _key_value(key: str, value: object) -> str:
    return f"{key}={value!r}"


TEXT_CHAIN: list[Processor] = [
    iso_time,
    level_name,
    who_and_source,
    ConsoleRenderer(
        columns=[
            Column("time", _plain()),
            Column("who", _plain(24)),
            Column("source", _plain(8)),
            Column("event", _plain()),
            Column("", _key_value),
        ]
    ),
]
"""``.log`` files: ``<time> <host> rank <r> local <l> <stream or LEVEL> <message>``."""

JSONL_CHAIN: list[Processor] = [iso_time, level_name, EventRenamer("message"), JSONRenderer()]
"""``.jsonl`` files: one JSON object per record, with the keys of `event_dict` (``event`` as ``message``)."""

CONSOLE_CHAIN: list[Processor] = [
    console_prefix,
    safe_for_terminal,
    ConsoleRenderer(columns=[Column("prefix", _plain()), Column("event", _plain()), Column("", _key_value)]),
]
"""The launcher's console: ``[<host> rank <r>] <message>``, escape sequences shown, not acted on
(colours kept)."""
