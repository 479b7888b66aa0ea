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
import select
import signal
import socket
import sys
import sysconfig
import threading
import time
import traceback
import types
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

from . import _pickling, _proc
from .channel import Channel

__all__ = ["WorkerLaunch", "fork_worker"]

# Exit code of a worker whose function raised (the exception itself travels separately).
EXIT_RAISED = 1


@dataclass(frozen=True)
class WorkerLaunch:
    """What one worker needs, besides the function payload."""

    rank: int
    local_rank: int
    env: Mapping[str, str]
    backend: str | None
    timeout: int
    sys_path: tuple[str, ...] = ()
    """The launcher's ``sys.path``: what imports there, imports here (same paths permitting)."""
    hang_timeout: float | None = None
    """Report the worker as stalled once its main thread stays put this long (None: never)."""


@dataclass
class ForkedWorker:
    """The agent's handle on a forked worker: its pid and the agent ends of its pipes."""

    launch: WorkerLaunch
    pid: int
    control: Channel
    stdout: int
    stderr: int


def fork_worker(launch: WorkerLaunch, payload: bytes | bytearray, keep_fds: tuple[int, ...] = ()) -> ForkedWorker:
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
            _run(launch, payload, Channel(worker_end))
        finally:
            os._exit(70)  # only reached if _run itself broke
    worker_end.close()
    os.close(out_w)
    os.close(err_w)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    return ForkedWorker(launch, pid, Channel(agent_end), out_r, err_r)


def _prepare_process(agent_pid: int, out_w: int, err_w: int, keep: tuple[int, ...]) -> None:
    os.setpgid(0, 0)  # our own process group, so the agent can kill us with our children
    _proc.die_with_parent(signal.SIGKILL)
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

    def send(self, header: tuple[Any, ...], *blob: bytes | memoryview) -> None:
        with self._lock:
            self._channel.send(header, *blob)


class _ChannelLogHandler(logging.Handler):
    """Forwards Python logging records, with their level, to the agent."""

    def __init__(self, channel: _LockedChannel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # A formatted warning ends with a newline (and its source line): not part of the message.
            message = self.format(record).rstrip("\n")
            self._channel.send(("log", record.created, record.levelno, record.name, message))
        except Exception:
            self.handleError(record)


def _run(launch: WorkerLaunch, payload: bytes | bytearray, channel: Channel) -> NoReturn:
    os.environ.update(launch.env)
    sys.path[:] = [*launch.sys_path, *(p for p in sys.path if p not in launch.sys_path)]
    _share_cpu_threads(launch)
    control = _LockedChannel(channel)
    _capture_logging(control)
    # `kill -USR1 <worker>` (or a hang report) writes every thread's stack into the worker's log.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    if launch.hang_timeout is not None:
        threading.Thread(
            target=_watch_progress, args=(channel, control, launch.local_rank, launch.hang_timeout), daemon=True
        ).start()
    exit_code = 0
    try:
        func, args, kwargs = _pickling.loads(payload)
        _use_own_gpu(launch)
        if launch.backend is not None:
            _init_process_group(launch)
        result = func(*args, **kwargs)
        try:
            blob = _pickling.dumps(result)
        except Exception as e:
            raise TypeError(
                f"the return value of rank {launch.rank} (of type {type(result).__qualname__}) "
                f"cannot be pickled to send it to the launcher: {e}"
            ) from e
        control.send(("result", launch.local_rank), *blob)
        _destroy_process_group()  # after sending: the launcher need not wait for it
    except SystemExit as e:  # sys.exit() in a worker is an exit, reported with its code
        exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        _send_exception(control, launch, e)
        exit_code = EXIT_RAISED
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(exit_code)


def _watch_progress(channel: Channel, control: _LockedChannel, local_rank: int, bound: float) -> None:
    """Report once the main thread has made no progress for `bound` seconds. When the agent
    asks (another rank looks hung), write every thread's stack to stderr and report how long.

    No progress: the main thread stays at the same bytecode and uses no CPU time, as a rank
    blocked in a collective, on a lock or in a sleep does. A rank spinning on the CPU counts
    as progressing. This thread is the only reader of `channel`.
    """
    main = threading.main_thread()
    assert main.ident is not None
    cpu_clock = time.pthread_getcpuclockid(main.ident)
    interval = min(1.0, bound / 4)
    last: tuple[Any, ...] = ()
    since, reported = time.monotonic(), False
    while True:
        asked = bool(select.select([channel.sock], [], [], interval)[0])
        if asked:
            channel.recv()  # ("report",)
        frame = sys._current_frames().get(main.ident)
        state = (id(frame), frame.f_lasti if frame else -1, time.clock_gettime_ns(cpu_clock))
        now = time.monotonic()
        if state != last:
            last, since, reported = state, now, False
        if frame is None:
            continue
        if asked:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            control.send(("stalled", local_rank, now - since, _where(frame)))
        elif not reported and now - since >= bound:
            control.send(("stalled", local_rank, now - since, _where(frame)))
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


def _share_cpu_threads(launch: WorkerLaunch) -> None:
    """Give each worker its share of the host's cores for torch's intra-op threads.

    Otherwise every worker starts one thread per core and N workers oversubscribe the host
    N times over. An explicit ``OMP_NUM_THREADS`` (forwarded by the default ``env_vars``) wins.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    local_world_size = int(launch.env.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size)))


def _send_exception(control: _LockedChannel, launch: WorkerLaunch, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # Into the worker's log too, where whoever reads the log of this rank looks for it.
    control.send(("log", time.time(), logging.ERROR, "torchrunx", f"rank {launch.rank} raised:\n{text.rstrip()}"))
    try:
        blob = _pickling.dumps(exc)
    except Exception:
        blob = []  # the launcher raises a WorkerError with the type name and text instead
    control.send(("error", launch.local_rank, type(exc).__qualname__, str(exc), text), *blob)


def _capture_logging(control: _LockedChannel) -> None:
    """Forward every logging record at or above ``$TORCHRUNX_LOG_LEVEL`` (default INFO), and
    warnings, to the agent: no logging setup needed in the user's function."""
    name = os.environ.get("TORCHRUNX_LOG_LEVEL", "INFO").strip().upper()
    level = int(name) if name.isdigit() else logging.getLevelName(name)
    handler = _ChannelLogHandler(control)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else logging.INFO)
    logging.captureWarnings(True)


def _use_own_gpu(launch: WorkerLaunch) -> None:
    """With CUDA, the worker's current device is the GPU of its local rank (when there is one)."""
    import torch

    if torch.cuda.is_available() and launch.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(launch.local_rank)


def _init_process_group(launch: WorkerLaunch) -> None:
    import torch
    import torch.distributed as dist

    backend = launch.backend
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=launch.timeout)
    world_size = int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, world_size, False, timeout)  # type: ignore[attr-defined]
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=world_size, timeout=timeout)
    if backend != "nccl":
        # Gloo connects its full mesh during init; a rank whose function returns at once would
        # otherwise close its sockets while a peer is still connecting to it.
        dist.barrier()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
