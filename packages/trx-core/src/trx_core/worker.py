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

import atexit
import contextlib
import faulthandler
import gc
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import types
from _io import _IOBase
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

from . import _pickling, processes
from .channel import Channel
from .logs import log_level_from_env
from .protocol import Message, WorkerLog, WorkerRaised, WorkerResult, WorkerSpec, WorkerStarted

__all__ = ["ForkedWorker", "fork_worker"]

# Exit code of a worker whose function raised (the exception itself travels separately).
EXIT_RAISED = 1
EXIT_GRACE_VAR = "TORCHRUNX_EXIT_GRACE"
_EXIT_GRACE_S = 30.0


@dataclass
class ForkedWorker:
    """The agent's handle on a forked worker: its pid and the agent ends of its pipes."""

    spec: WorkerSpec
    pid: int
    control: Channel
    stdout: int
    stderr: int


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
                self._channel.send(WorkerLog(record.created, record.levelno, record.name, message))
        except Exception:
            self.handleError(record)


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
    _start_like_a_fresh_program()
    _become_like_torchrun_worker(spec)
    control = _LockedChannel(channel)
    worker_pid = os.getpid()
    _capture_logging(control)
    # `kill -USR1 <worker>` (or a hang report) writes every thread's stack into the worker's log.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    if spec.hang_timeout is not None:
        from ._progress import watch_progress

        threading.Thread(
            target=watch_progress, args=(channel, control, spec.local_rank, spec.hang_timeout), daemon=True
        ).start()
    raised: BaseException | None = None
    result: Any = None
    try:
        func, args, kwargs = _pickling.loads(payload)
        _mirror_main(func, spec.main_path)
        _use_own_gpu(spec)
        if spec.backend is not None:
            _init_process_group(spec)
        control.send(WorkerStarted(spec.local_rank, forked, time.time()))
        result = func(*args, **kwargs)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: each is reported as what it is
        raised = e
    if os.getpid() != worker_pid:
        _end_forked_child(raised)  # a raw os.fork() child that came back through the function
    exit_code = _report(control, spec, result, raised)
    _exit_like_python(exit_code, tear_down_group=raised is None)


def _start_like_a_fresh_program() -> None:
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


def _exit_like_python(code: int, tear_down_group: bool) -> NoReturn:
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


def _become_like_torchrun_worker(spec: WorkerSpec) -> None:
    """What libraries expect of a torchrun worker: its environment, ``sys.argv`` and ``sys.path``
    as the launcher's, and torch's CPU threads shared among the host's workers."""
    os.environ.update(spec.env)
    sys.path[:] = [*spec.sys_path, *(p for p in sys.path if p not in spec.sys_path)]
    sys.argv[:] = list(spec.argv) or [""]
    _share_cpu_threads(spec)


def _mirror_main(func: Any, main_path: str | None) -> None:
    """Make ``__main__`` a module like the launcher's script, holding what the function uses.

    Objects defined in the user's script travel by value and come out with ``__module__`` set
    to ``__main__``. With them in this process's ``__main__``, pickling by reference works in
    the worker's own children (multiprocessing, DataLoader workers), and a spawned child
    re-imports the script as ``__mp_main__`` from ``__file__``, as it would under torchrun.
    The script itself is not run here: that would repeat its top level in every worker.
    """
    main = types.ModuleType("__main__")
    if main_path is not None:
        main.__file__ = main_path
    main.__dict__["__builtins__"] = __builtins__
    if getattr(func, "__module__", None) == "__main__":
        main.__dict__.update(getattr(func, "__globals__", {}))
        main.__dict__.setdefault(getattr(func, "__name__", "func"), func)
    main.__dict__["__name__"] = "__main__"
    sys.modules["__main__"] = main


def _share_cpu_threads(spec: WorkerSpec) -> None:
    """Give each worker its share of the host's cores for CPU threads, as torchrun does.

    Otherwise every worker (and each of its own subprocesses) starts one thread per core and
    N workers oversubscribe the host N times over. An explicit ``OMP_NUM_THREADS`` (forwarded
    by the default ``env_vars``) wins; otherwise it is exported, so the worker's children get
    it too.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    local_world_size = int(spec.env.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _send_exception(control: _LockedChannel, spec: WorkerSpec, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if not isinstance(exc, SystemExit):  # Python prints no traceback for an exit
        # Into the worker's log too, where whoever reads the log of this rank looks for it.
        control.send(WorkerLog(time.time(), logging.ERROR, "torchrunx", f"rank {spec.rank} raised:\n{text.rstrip()}"))
    if isinstance(exc, SystemExit) and not isinstance(exc.code, (int, type(None))):
        exc = SystemExit(_safe_str(exc.code))  # the code may be any object; its text is what Python shows
    try:
        blob = _pickling.dumps_exception(exc)
    except Exception:
        blob = []  # the launcher raises a WorkerError with the type name and text instead
    control.send(WorkerRaised(spec.local_rank, type(exc).__qualname__, _safe_str(exc), text), *blob)


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


def _use_own_gpu(spec: WorkerSpec) -> None:
    """With CUDA, the worker's current device is the GPU of its local rank (when there is one)."""
    import torch

    if torch.cuda.is_available() and spec.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(spec.local_rank)


def _init_process_group(spec: WorkerSpec) -> None:
    import torch
    import torch.distributed as dist

    backend = spec.backend
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=spec.timeout)
    world_size = int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, world_size, False, timeout)  # type: ignore[attr-defined]
    dist.init_process_group(backend, store=store, rank=spec.rank, world_size=world_size, timeout=timeout)
    if backend != "nccl":
        # Gloo connects its full mesh during init; a rank whose function returns at once would
        # otherwise close its sockets while a peer is still connecting to it.
        dist.barrier()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
