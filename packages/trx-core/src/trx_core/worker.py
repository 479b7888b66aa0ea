"""The worker: a process forked by the agent that runs the user's function once.

The agent has already imported torch, so a forked worker starts in milliseconds. In the
child, everything the agent owned is dropped (signal handlers, file descriptors), output is
redirected to the agent's pipes, the process group is initialised, and the function's
return value or exception is sent back over the worker's control socket.
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
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

from . import _pickling, processes
from .channel import Channel
from .logs import log_level_from_env
from .protocol import Message, WorkerLog, WorkerRaised, WorkerResult, WorkerSpec

__all__ = ["ForkedWorker", "fork_worker"]

# Exit code of a worker whose function raised (the exception itself travels separately).
EXIT_RAISED = 1


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
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
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
    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()

    def send(self, message: Message, *blob: bytes | memoryview) -> None:
        with self._lock:
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
    _become_like_torchrun_worker(spec)
    control = _LockedChannel(channel)
    _capture_logging(control)
    # `kill -USR1 <worker>` (or a hang report) writes every thread's stack into the worker's log.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    if spec.hang_timeout is not None:
        from ._progress import watch_progress

        threading.Thread(
            target=watch_progress, args=(channel, control, spec.local_rank, spec.hang_timeout), daemon=True
        ).start()
    exit_code = 0
    try:
        func, args, kwargs = _pickling.loads(payload)
        _mirror_main(func, spec.main_path)
        _use_own_gpu(spec)
        if spec.backend is not None:
            _init_process_group(spec)
        result = func(*args, **kwargs)
        try:
            blob = _pickling.dumps(result)
        except Exception as e:
            raise TypeError(
                f"the return value of rank {spec.rank} (of type {type(result).__qualname__}) "
                f"cannot be pickled to send it to the launcher: {e}"
            ) from e
        control.send(WorkerResult(spec.local_rank), *blob)
        _destroy_process_group()  # after sending: the launcher need not wait for it
    except SystemExit as e:  # sys.exit() in a worker is an exit, reported with its code
        exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        _send_exception(control, spec, e)
        exit_code = EXIT_RAISED
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(exit_code)


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
    # Into the worker's log too, where whoever reads the log of this rank looks for it.
    control.send(WorkerLog(time.time(), logging.ERROR, "torchrunx", f"rank {spec.rank} raised:\n{text.rstrip()}"))
    try:
        blob = _pickling.dumps(exc)
    except Exception:
        blob = []  # the launcher raises a WorkerError with the type name and text instead
    control.send(WorkerRaised(spec.local_rank, type(exc).__qualname__, str(exc), text), *blob)


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
