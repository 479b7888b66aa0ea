"""Writing off the launcher's loop: a bounded queue drained by a thread of its own.

The launcher's loop also answers heartbeats, so it must never wait for a destination that
can stall: a terminal paused with Ctrl-S or scrolled back in ``less``/tmux, a metrics
server that hangs. A log pipeline hands such writes to a `BackgroundWriter`: `put` returns
at once, a thread writes the items in order, and when the destination falls too far behind,
items are dropped and counted rather than the loop blocked or memory filled. The count
comes back in the stream itself, as a note written where the items are missing.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BackgroundWriter"]

T = TypeVar("T")

CLOSE_WAIT_S = 2.0
"""How long `BackgroundWriter.close` waits, by default, for the queue to be written."""

GATHER_S = 0.01
"""How long the thread lets items gather once one arrives: it then takes them as one batch.
Waking up for each item would cost the launcher's loop the GIL hand-over each time, and
halve the rate at which a flood of output reaches the files."""


def _one(item: object) -> int:
    return 1


class BackgroundWriter(Generic[T]):
    """Calls ``write(items)`` with the items `put`, in order and in batches, on a daemon
    thread named `name`.

    The queue holds items of a total `size` of at most `capacity` (a batch is in the queue
    until `write` returns). `put` never blocks: an
    item that does not fit is dropped and counted, and before the next item that fits, the
    item ``note(count)`` is written (so a console shows "N lines not shown" where they are
    missing). If `write` raises, ``on_error(exception)`` is called once, on the thread, and
    nothing more is written.

    `close` waits a bounded time for the queue to be written, then drops what is left (with
    a note) and returns; the thread ends once its current write returns. With
    `finish_at_exit`, the interpreter waits at exit for that write and the note after it,
    as it waits for any program's last output (a daemon thread is otherwise stopped
    mid-write, and the note is lost).
    """

    def __init__(
        self,
        name: str,
        write: Callable[[list[T]], object],
        note: Callable[[int], T],
        *,
        capacity: int,
        size: Callable[[T], int] = _one,
        on_error: Callable[[Exception], object] = lambda error: None,
        finish_at_exit: bool = False,
    ) -> None:
        self._write = write
        self._note = note
        self._capacity = capacity
        self._size = size
        self._on_error = on_error
        self._finish_at_exit = finish_at_exit
        self._cond = threading.Condition()
        # (item, its size, how many dropped items it is a note of: 0 for an item put)
        self._queue: deque[tuple[T, int, int]] = deque()
        self._queued_size = 0  # queued and being written
        self._unnoted = 0  # dropped, not yet in a note
        self._closing = False
        self.dropped = 0
        """How many items were dropped so far, including those left when `close` gave up."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> bool:
        """Queue `item` for writing; False if it was dropped (the queue is full or closed)."""
        cost = self._size(item)
        with self._cond:
            # An item larger than the whole queue still goes through an empty one.
            if self._closing or (self._queue and self._queued_size + cost > self._capacity):
                self._unnoted += 1
                self.dropped += 1
                return False
            idle = not self._queue  # else the thread finds this item with the others anyway
            self._queue_note()
            self._queue.append((item, cost, 0))
            self._queued_size += cost
            if idle:
                self._cond.notify()
        return True

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Write what is queued, waiting at most `timeout` seconds; then drop the rest and return."""
        with self._cond:
            if self._closing:
                return
            self._queue_note()
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return
        with self._cond:
            # Still in a write: what it has not reached is dropped, and said so once it is back.
            notes = [dropped for _, _, dropped in self._queue]
            self.dropped += notes.count(0)  # the notes' items were counted when dropped
            lost = sum(dropped or 1 for dropped in notes)
            self._queue.clear()
            self._queued_size = 0
            if lost:
                self._queue.append((self._note(lost), 0, lost))
        if self._finish_at_exit:
            _unfinished.add(self._thread)

    def _queue_note(self) -> None:
        if self._unnoted:
            self._queue.append((self._note(self._unnoted), 0, self._unnoted))
            self._unnoted = 0

    def _run(self) -> None:
        failed = False
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
            if not self._closing:
                time.sleep(GATHER_S)
            with self._cond:
                batch = [item for item, _, _ in self._queue]
                cost = sum(cost for _, cost, _ in self._queue)
                self._queue.clear()
            if not failed:
                try:
                    self._write(batch)
                except Exception as e:
                    failed = True
                    self._on_error(e)
            with self._cond:
                self._queued_size = max(0, self._queued_size - cost)  # 0 already if close() gave up on it
        _unfinished.discard(threading.current_thread())


_unfinished: set[threading.Thread] = set()


@atexit.register
def _finish_writes() -> None:
    for thread in list(_unfinished):
        thread.join()
