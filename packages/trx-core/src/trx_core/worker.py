"""The worker: a process forked by the agent that runs the user's function once.

The agent has already imported torch, so a forked worker starts in milliseconds. In the
child, everything the agent owned is dropped (signal handlers, ``atexit`` handlers, file
descriptors), output is redirected to the agent's pipes, the process group is initialised,
and the function's return value or exception is sent back over the worker's control socket.

Then the worker ends as a Python program does (`_exit_like_python`): non-daemon threads are
joined, ``atexit`` handlers run, files left open are closed (so what was written to them is on
disk), each step bounded by ``$TORCHRUNX_EXIT_GRACE`` seconds (default 30) and said in the
worker's log when it runs over. Only the interpreter's own teardown is skipped (``os._exit``):
it would cost a few hundred milliseconds of torch's finalisers, for nothing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

from . import _pickling, processes
from ._debug_worker import WorkerDebugger
from ._progress import watch_progress
from ._worker_env import become_like_torchrun_worker, init_process_group, mirror_main, use_own_gpu
from ._worker_exit import exit_like_python, start_like_a_fresh_program
from .channel import Channel
from .logs import log_level_from_env
from .protocol import Message, WorkerLog, WorkerRaised, WorkerResult, WorkerSpec, WorkerStarted

__all__ = ["MAX_LOG_MESSAGE_BYTES", "ForkedWorker", "LogMessageTooLargeError", "fork_worker"]

# Exit code of a worker whose function raised (the exception itself travels separately).
EXIT_RAISED = 1

MAX_LOG_MESSAGE_BYTES = 16 * 2**20
"""The largest logging message (UTF-8) a worker sends its agent: a record is one frame of the
control socket, and a frame's message is limited (64 MiB) so that a garbled length cannot make
its reader allocate without bound. Output printed to stdout or stderr has no such limit (long
lines are cut into records)."""

# The text of an exception and its traceback, sent for the logs and the launcher's error, keep
# this many characters (their start and end): the exception itself travels whole, in the blob.
_MAX_REPORT_CHARS = 1 << 20


class LogMessageTooLargeError(ValueError):
    """Raised by a logging call in a worker whose message is over `MAX_LOG_MESSAGE_BYTES`."""


@dataclass
class ForkedWorker:
    """The agent's handle on a forked worker: its pid and the agent ends of its pipes."""

    spec: WorkerSpec
    pid: int
    control: Channel
    stdout: int
    stderr: int
    killed_because: str = ""  # why the agent killed it, if it did


def fork_worker(spec: WorkerSpec, payload: bytes | bytearray, keep_fds: tuple[int, ...] = ()) -> ForkedWorker:
    """Fork a worker. In the parent, return its handle; the child never returns."""
    agent_end, worker_end = socket.socketpair()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    agent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        try:
            agent_end.close()
            os.close(out_r)
            os.close(err_r)
            _prepare_process(agent_pid, out_w, err_w, keep=(worker_end.fileno(), *keep_fds))
            _run(spec, payload, Channel(worker_end))
        finally:
            os._exit(70)  # only reached if _run itself broke
    worker_end.close()
    os.close(out_w)
    os.close(err_w)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    return ForkedWorker(spec, pid, Channel(agent_end), out_r, err_r)


def _prepare_process(agent_pid: int, out_w: int, err_w: int, keep: tuple[int, ...]) -> None:
    os.setpgid(0, 0)  # our own process group, so the agent can kill us with our children
    processes.die_with_parent(signal.SIGKILL)
    if os.getppid() != agent_pid:  # the agent died before prctl took effect
        os._exit(1)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python program: KeyboardInterrupt
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    # Drop every descriptor inherited from the agent (its connection to the launcher,
    # other workers' pipes) except ours.
    keep_sorted = sorted(fd for fd in set(keep) if fd > 2)
    low = 3
    for fd in keep_sorted:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    sys.stdout = _line_stream(1)
    sys.stderr = _line_stream(2)


def _line_stream(fd: int) -> io.TextIOWrapper:
    # Write-through, so a line printed right before a crash is already in the pipe.
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", line_buffering=True, write_through=True)


class _LockedChannel:
    """The worker's side of its control socket, shared by its threads. In a process the worker
    forks (``os.fork``, a fork-started data loader), it falls silent: only the worker speaks
    for its rank, and a child writing into the same socket would garble the worker's messages."""

    def __init__(self, channel: Channel) -> None:
        self._channel: Channel | None = channel
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._fall_silent)

    @property
    def silent(self) -> bool:
        return self._channel is None

    def _fall_silent(self) -> None:
        self._channel = None
        self._lock = threading.Lock()  # the parent's may have been held by another thread at the fork

    def send(self, message: Message, *blob: bytes | memoryview) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.send(message, *blob)


class _ChannelLogHandler(logging.Handler):
    """Forwards Python logging records, with their level, to the agent (unless the record is
    printed to the worker's stdout or stderr already, which the agent captures anyway)."""

    def __init__(self, channel: _LockedChannel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        if _printed_to_a_standard_stream(record):
            return
        try:
            # A formatted warning ends with a newline (and its source line): not part of the message.
            message = self.format(record).rstrip("\n")
            if self._channel.silent:  # in a process the worker forked: its output is captured anyway
                print(message, file=sys.stderr, flush=True)
            else:
                _check_size(record, message)
                self._channel.send(WorkerLog(record.created, record.levelno, record.name, message))
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """Let a message too large to send fail the logging call, where the user can see which
        one it was: logging's own handling would print a traceback to stderr and go on without it."""
        if isinstance(sys.exc_info()[1], LogMessageTooLargeError):
            raise  # we are in emit's except clause: this re-raises the error
        super().handleError(record)


def _check_size(record: logging.LogRecord, message: str) -> None:
    if len(message) <= MAX_LOG_MESSAGE_BYTES // 4:  # UTF-8 takes at most 4 bytes a character
        return
    size = len(message.encode("utf-8", "surrogatepass"))  # as pickle encodes it
    if size > MAX_LOG_MESSAGE_BYTES:
        raise LogMessageTooLargeError(
            f"a logging message of {size:,} bytes (logger {record.name!r}, level {record.levelname}) is over "
            f"torchrunx's limit of {MAX_LOG_MESSAGE_BYTES:,} bytes for one message from a worker: write large "
            "data to a file (and log its path), or print it (printed output has no limit; long lines are cut)"
        )


def _printed_to_a_standard_stream(record: logging.LogRecord) -> bool:
    """True if a handler on the record's way up (Lightning's own, or one of basicConfig) writes
    it to standard output or error: then it reaches the logs as a line of output already."""
    streams = (sys.stdout, sys.stderr)
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        for handler in logger.handlers:
            if (
                isinstance(handler, logging.StreamHandler)
                and getattr(handler, "stream", None) in streams
                and record.levelno >= handler.level
            ):
                return True
        logger = logger.parent if logger.propagate else None
    return False


def _run(spec: WorkerSpec, payload: bytes | bytearray, channel: Channel) -> NoReturn:
    forked = time.time()
    start_like_a_fresh_program()
    become_like_torchrun_worker(spec)
    control = _LockedChannel(channel)
    worker_pid = os.getpid()
    _capture_logging(control)
    # `kill -USR1 <worker>` (or a hang report) writes every thread's stack into the worker's log.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    debugger = WorkerDebugger(control, spec.local_rank)  # breakpoint() opens pdb in the launcher's terminal
    debugger.install()
    threading.Thread(
        target=watch_progress, args=(channel, control, spec.local_rank, spec.hang_timeout, debugger), daemon=True
    ).start()
    raised: BaseException | None = None
    result: Any = None
    try:
        func, args, kwargs = _pickling.loads(payload)
        mirror_main(func, spec.main_path)
        use_own_gpu(spec)
        if spec.backend is not None:
            init_process_group(spec)
        control.send(WorkerStarted(spec.local_rank, forked, time.time()))
        result = func(*args, **kwargs)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: each is reported as what it is
        raised = e
        debugger.post_mortem(e)  # with Launcher(post_mortem=True): pdb where it was raised
    if os.getpid() != worker_pid:
        _end_forked_child(raised)  # a raw os.fork() child that came back through the function
    exit_code = _report(control, spec, result, raised)
    exit_like_python(exit_code, tear_down_group=raised is None)


def _report(control: _LockedChannel, spec: WorkerSpec, result: Any, raised: BaseException | None) -> int:
    """Send the function's outcome to the agent; the worker's exit code."""
    if isinstance(raised, SystemExit):
        code = raised.code
        if code is None or code == 0:  # an exit that says success: the rank returns None
            raised, result = None, None
        else:
            if not isinstance(code, int):
                print(code, file=sys.stderr, flush=True)  # as Python prints sys.exit("message")
            _send_exception(control, spec, raised)
            return code if isinstance(code, int) else 1
    if raised is not None:
        _send_exception(control, spec, raised)
        return EXIT_RAISED
    try:
        blob = _pickling.dumps(result)
    except Exception as e:
        error = TypeError(
            f"the return value of rank {spec.rank} (of type {type(result).__qualname__}) "
            f"cannot be pickled to send it to the launcher: {_safe_str(e)}"
        )
        error.__cause__ = e
        _send_exception(control, spec, error)
        return EXIT_RAISED
    control.send(WorkerResult(spec.local_rank), *blob)
    return 0


def _end_forked_child(raised: BaseException | None) -> NoReturn:
    """End a process that the function forked and that returned (or raised) through it: it is
    not the worker, and says nothing for its rank. It exits as a Python program would, minus
    the exit handlers, which are its parent's."""
    code = 0
    if isinstance(raised, SystemExit):
        code = raised.code if isinstance(raised.code, int) else (0 if raised.code is None else 1)
        if not isinstance(raised.code, int) and raised.code is not None:
            print(raised.code, file=sys.stderr)
    elif raised is not None:
        traceback.print_exception(type(raised), raised, raised.__traceback__)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _send_exception(control: _LockedChannel, spec: WorkerSpec, exc: BaseException) -> None:
    text = _clip("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if not isinstance(exc, SystemExit):  # Python prints no traceback for an exit
        # Into the worker's log too, where whoever reads the log of this rank looks for it.
        control.send(WorkerLog(time.time(), logging.ERROR, "torchrunx", f"rank {spec.rank} raised:\n{text.rstrip()}"))
    if isinstance(exc, SystemExit) and not isinstance(exc.code, (int, type(None))):
        exc = SystemExit(_safe_str(exc.code))  # the code may be any object; its text is what Python shows
    try:
        blob = _pickling.dumps_exception(exc)
    except Exception:
        blob = []  # the launcher raises a WorkerError with the type name and text instead
    control.send(WorkerRaised(spec.local_rank, type(exc).__qualname__, _clip(_safe_str(exc)), text), *blob)


def _clip(text: str) -> str:
    """`text`, or its start and end if it is longer than a message to the agent may be."""
    if len(text) <= _MAX_REPORT_CHARS:
        return text
    half = _MAX_REPORT_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half:,} characters cut by torchrunx ...]\n{text[-half:]}"


def _safe_str(obj: object) -> str:
    """``str(obj)``, or what Python prints when that raises."""
    try:
        return str(obj)
    except Exception:
        return (
            "<exception str() failed>" if isinstance(obj, BaseException) else f"<{type(obj).__qualname__} str() failed>"
        )


def _capture_logging(control: _LockedChannel) -> None:
    """Forward every logging record at or above ``$TORCHRUNX_LOG_LEVEL`` (default INFO), and
    warnings, to the agent: no logging setup needed in the user's function."""
    try:
        level = log_level_from_env()
    except ValueError:
        level = logging.INFO  # the launcher has refused a bad value already
    handler = _ChannelLogHandler(control)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
