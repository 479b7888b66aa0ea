"""How a worker ends: like the Python program the user wrote, and still fast.

After the function returns or raises, non-daemon threads are joined, ``atexit`` handlers run,
the process group is torn down, files left open are closed and the standard streams flushed,
each step bounded by ``$TORCHRUNX_EXIT_GRACE`` seconds (reported in the worker's log when it
runs over); then `os._exit`, which skips the interpreter's slow teardown of torch.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import logging
import os
import sys
import threading
import time
import traceback
from _io import _IOBase
from collections.abc import Iterator
from typing import Any, NoReturn

__all__ = ["EXIT_GRACE_VAR", "exit_like_python", "start_like_a_fresh_program"]

EXIT_GRACE_VAR = "TORCHRUNX_EXIT_GRACE"
_EXIT_GRACE_S = 30.0


def start_like_a_fresh_program() -> None:
    """Drop what the worker inherited from the agent that a new interpreter would not have."""
    # Everything the agent allocated (torch's modules...) is frozen out of the collector's
    # sight: collections no longer touch those pages (less copy-on-write), and the walk for
    # open files at exit (`_close_open_files`) only sees what this worker created.
    gc.freeze()
    # The agent's exit handlers are not the user's program's; logging's is, as in any program
    # that imported logging (registered first, so it runs last).
    atexit._clear()
    atexit.register(logging.shutdown)
    sys.addaudithook(_note_files_opened_for_writing)


_opened_for_writing: list[bool] = []  # non-empty once this worker opened a file it can write


def _note_files_opened_for_writing(event: str, args: tuple[Any, ...]) -> None:
    """An audit hook: the walk for open files at exit is only needed (and only paid for) in
    a worker that opened a file for writing (``open``, ``os.open``, ``os.fdopen``, pipes...)."""
    if event == "open" and not _opened_for_writing:
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
        ):
            _opened_for_writing.append(True)


def exit_like_python(code: int, tear_down_group: bool) -> NoReturn:
    """End the worker as the interpreter ends a program, each step bounded by the exit grace:
    join non-daemon threads, run ``atexit`` handlers, close files left open; then `os._exit`."""
    grace = _exit_grace()
    _join_threads(grace)
    with _bounded("the atexit handlers", grace, code):
        atexit._run_exitfuncs()
    if tear_down_group:
        with _bounded("destroying the process group", grace, code):
            _destroy_process_group()
    with _bounded("closing the files left open", grace, code):
        _flush_standard_streams()
        _close_open_files()
    _flush_standard_streams()
    os._exit(code)


def _exit_grace() -> float:
    try:
        return max(0.0, float(os.environ.get(EXIT_GRACE_VAR, _EXIT_GRACE_S)))
    except ValueError:
        return _EXIT_GRACE_S


def _join_threads(grace: float) -> None:
    """Wait for non-daemon threads, as the interpreter does before exit (after running the
    callbacks it runs first, e.g. `concurrent.futures`' that lets executor threads finish)."""
    for callback in reversed(getattr(threading, "_threading_atexits", [])):
        try:
            callback()
        except Exception:
            traceback.print_exc()
    deadline = time.monotonic() + grace
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t is not current and not t.daemon and t.is_alive()]
    if left:
        _say(
            f"torchrunx: non-daemon thread{'s' * (len(left) > 1)} {', '.join(left)} still running "
            f"{grace:g} s after the function ended ({EXIT_GRACE_VAR}={grace:g}): the worker exits without "
            "waiting for them any longer"
        )


@contextlib.contextmanager
def _bounded(what: str, grace: float, code: int) -> Iterator[None]:
    """Run the body in this thread; if it takes longer than `grace`, say so in the log and exit
    with `code` from a watchdog thread."""

    def give_up() -> None:
        _say(
            f"torchrunx: {what} still running {grace:g} s after the function ended ({EXIT_GRACE_VAR}={grace:g}): "
            "the worker exits without waiting for them any longer"
        )
        os._exit(code)

    timer = threading.Timer(grace, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception:
        traceback.print_exc()
    finally:
        timer.cancel()


def _say(text: str) -> None:
    """Write a line to the worker's stderr (its log) at the descriptor level, whatever became of sys.stderr."""
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode("utf-8", "backslashreplace"))


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


def _close_open_files() -> None:
    """Close the file objects this worker left open, as the interpreter's teardown would (text
    wrappers first: they hand their pending text to the buffered file below them). What was
    written without a ``close()`` or ``flush()`` reaches the file: buffered writers, text
    files, gzip files alike. The standard streams are only flushed."""
    if not _opened_for_writing:
        return
    keep = {id(s) for s in (sys.stdout, sys.stderr, sys.stdin, sys.__stdout__, sys.__stderr__, sys.__stdin__)}
    files = [o for o in gc.get_objects() if isinstance(o, _IOBase) and id(o) not in keep]
    files.sort(key=lambda f: not isinstance(f, io.TextIOBase))
    for file in files:
        try:
            if not file.closed:
                file.close()
        except Exception:
            pass  # a detached wrapper, a broken pipe...: as in a finaliser, nothing to be done


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
