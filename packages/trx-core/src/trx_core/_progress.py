"""Hang detection inside a worker: a thread that watches the main thread for progress, and reads
what the agent sends the worker (stack dumps, the debugger's messages)."""

from __future__ import annotations

import faulthandler
import os
import select
import sys
import sysconfig
import threading
import time
import traceback
import types
from typing import Any, Protocol

from . import processes
from .channel import Channel, ChannelClosed
from .protocol import Message, ReportProgress, WorkerStalled

__all__ = ["watch_progress"]


class _Sender(Protocol):
    def send(self, message: Message, *blob: bytes | memoryview) -> None: ...


class _Debugger(Protocol):
    @property
    def paused(self) -> bool: ...

    def on_message(self, message: Message) -> None: ...

    def channel_closed(self) -> None: ...


def watch_progress(
    channel: Channel, control: _Sender, local_rank: int, bound: float | None, debugger: _Debugger
) -> None:
    """Read what the agent sends this worker. Report once the main thread has made no progress
    for `bound` seconds (None: never). When the agent asks (another rank looks hung), write every
    thread's stack to stderr and report how long; hand the debugger's messages to `debugger`.

    No progress: the main thread stays at the same bytecode and uses no CPU time, as a rank
    blocked in a collective, on a lock or in a sleep does. A rank spinning on the CPU counts
    as progressing, and so does one waiting at a debugger prompt. This thread is the only
    reader of `channel`.
    """
    processes.leave_signals_to_the_main_thread()  # a user's handler (checkpoint on SIGUSR1) runs at once
    main = threading.main_thread()
    assert main.ident is not None
    cpu_clock = time.pthread_getcpuclockid(main.ident)
    interval = None if bound is None else min(1.0, bound / 4)
    last: tuple[Any, ...] = ()
    since, reported = time.monotonic(), False
    while True:
        asked = False
        if select.select([channel.sock], [], [], interval)[0]:
            try:
                message, _ = channel.recv()
            except (ChannelClosed, OSError):
                debugger.channel_closed()
                return  # the agent is gone (and kills this worker)
            match message:
                case ReportProgress():
                    asked = True
                case _:
                    debugger.on_message(message)
        frame = sys._current_frames().get(main.ident)
        state = (id(frame), frame.f_lasti if frame else -1, time.clock_gettime_ns(cpu_clock))
        now = time.monotonic()
        if state != last or debugger.paused:
            last, since, reported = state, now, False
        if frame is None:
            continue
        if asked:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            control.send(WorkerStalled(local_rank, now - since, _where(frame)))
        elif bound is not None and not reported and now - since >= bound:
            control.send(WorkerStalled(local_rank, now - since, _where(frame)))
            reported = True


def _where(frame: types.FrameType) -> str:
    """Where a stuck thread is: its innermost frame in the user's code (not torch's, the
    standard library's or ours), else its innermost frame."""
    library = (
        sysconfig.get_paths()["stdlib"],
        os.path.dirname(os.path.dirname(_torch_file())),
        os.path.dirname(__file__),
    )
    stack = traceback.extract_stack(frame)
    spot = next((f for f in reversed(stack) if not f.filename.startswith(library)), stack[-1])
    return f"{spot.filename}:{spot.lineno} in {spot.name}"


def _torch_file() -> str:
    import torch

    return str(torch.__file__)
