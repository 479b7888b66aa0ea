"""Catching the signals that a run sends on to its workers (SIGTERM, SIGUSR1, SIGUSR2).

Python runs signal handlers in the main thread only, and `signal.signal` refuses any other:
a run followed from another thread catches nothing. The handler does nothing but write the
signal's number into a pipe that the supervisor's selector watches (the self-pipe trick).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["FORWARDED_SIGNALS", "SignalCatcher"]

# Sent on to the workers; SIGINT is not: Ctrl-C stops the run at once (KeyboardInterrupt), and
# in a warm session it is caught only to stop the run's workers before that is raised.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalCatcher:
    """Catches `FORWARDED_SIGNALS` from `catch()` to `release()`, which puts the program's own
    handlers back and delivers to them again what arrived too late to concern the run (`late`)."""

    def __init__(self) -> None:
        self._pipe: tuple[int, int] | None = None  # written by the handler: (read, write)
        self._previous: dict[int, _Handler] = {}
        self._selector: selectors.BaseSelector | None = None
        self.late: list[int] = []

    def catch(self, selector: selectors.BaseSelector, interrupt: bool = False) -> None:
        """Start catching (main thread only); the pipe's read end is registered in `selector`.
        `interrupt`: SIGINT too (Ctrl-C), unless the program ignores it."""
        if threading.current_thread() is not threading.main_thread() or self._pipe is not None:
            return
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self._pipe = (read_end, write_end)
        self._selector = selector
        selector.register(read_end, selectors.EVENT_READ, ("signal", None))

        def note(signum: int, frame: object) -> None:
            # Only the self-pipe trick here: the selector loop does the work.
            with contextlib.suppress(OSError):
                os.write(write_end, bytes((signum,)))

        for signum in FORWARDED_SIGNALS:
            self._previous[signum] = signal.signal(signum, note)
        if interrupt and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, note)

    def read(self) -> list[int]:
        """The signals caught since the last call, in order."""
        if self._pipe is None:
            return []
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._pipe[0], 256):
                data += chunk
        return list(data)

    def release(self) -> None:
        """Give the signals back to the program's handlers; deliver again what arrived once
        the outcome was known (`late`), and what arrived after the run was followed."""
        if self._pipe is None:
            return
        late = self.late + self.read()
        for signum, previous in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is the nearest
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._pipe[0])
            self._selector = None
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None
        self.late = []
        for signum in dict.fromkeys(late):
            signal.raise_signal(signum)
