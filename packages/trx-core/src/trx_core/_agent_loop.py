"""The agent's event loop: forks the host's workers and relays everything they say.

Single-threaded and event-driven: one selector over the connection to the launcher, the
workers' control sockets and output pipes, and a wake-up pipe for signals (SIGCHLD, and SIGUSR1
or SIGUSR2 sent to the agent itself, which go on to its workers as a `Signal` from the launcher
does). The messages are those of `trx_core.protocol`. `trx_core.agent` starts it once the agent
is connected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import processes
from ._lines import LineSplitter
from .channel import HEARTBEAT_S, Channel, ChannelClosed
from .protocol import (
    AgentStopped,
    Beat,
    DiscardResult,
    DumpStacks,
    EndRun,
    ForWorkers,
    LogLine,
    Logs,
    ReportProgress,
    RunEnded,
    Signal,
    StartWorkers,
    Stop,
    WorkerExited,
    WorkerLog,
    WorkerSpec,
)
from .worker import ForkedWorker, fork_worker

if TYPE_CHECKING:
    from .agent import StoreProcesses

__all__ = ["AgentLoop"]

_READ_SIZE = 1 << 16
_MAX_DRAIN_READS = 256  # 16 MiB
# Text of one `Logs` frame: at most 4 bytes a character in UTF-8, so 16 MiB, a quarter of the
# limit of a frame's message. A line is at most 64 KiB (output) or 16 MiB (a logging record).
_MAX_BATCH_CHARS = 4 * 2**20
# Sent to the agent itself, they go on to its workers: SLURM signals every step of a job with
# `sbatch --signal=USR1@60` or `scancel --signal=USR1`, and with the srun executor an agent is a
# step. (SIGTERM stays the agent's own: it stops the agent, see trx_core.agent.)
_PASSED_ON = (signal.SIGUSR1, signal.SIGUSR2)
_STOPPING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # see trx_core.agent
_fork_hook_registered = False


class AgentLoop:
    """The agent's state and event loop. Owns every worker it forks."""

    def __init__(self, channel: Channel, heartbeat_timeout: float, stores: StoreProcesses | None = None) -> None:
        self.channel = channel  # to the launcher
        self.heartbeat_timeout = heartbeat_timeout
        self.stores = stores  # the rendezvous stores, on the agent that hosts them
        self.selector = selectors.DefaultSelector()
        self.workers: dict[int, ForkedWorker] = {}  # by pid
        self.ended: set[int] = set()  # pids of workers reaped
        self.splitters: dict[int, LineSplitter] = {}  # by pipe fd
        self.pending_logs: list[LogLine] = []
        wake_r, self._wake_w = os.pipe()
        self._wake_r = wake_r
        for fd in (wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.selector.register(channel.fileno(), selectors.EVENT_READ, ("launcher", None))
        self.selector.register(wake_r, selectors.EVENT_READ, ("wake", None))

    # -- events -----------------------------------------------------------------------
    def serve(self) -> str:
        """Follow events until the run ends; return why the agent stopped ("" when asked to)."""
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for passed_on in _PASSED_ON:
            signal.signal(passed_on, lambda *_: None)  # the wake-up pipe says which one came
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        global _fork_hook_registered
        if not _fork_hook_registered:
            os.register_at_fork(after_in_child=_unblock_passed_on)
            _fork_hook_registered = True
        while True:
            for key, _ in self.selector.select(HEARTBEAT_S):
                if self.selector.get_map().get(key.fileobj) is not key:
                    continue  # closed while an earlier event of this batch was handled
                kind, who = key.data
                if kind == "launcher":
                    reason = self._from_launcher()
                    if reason is not None:
                        return reason
                elif kind == "wake":
                    for signum in self._drain_wakeups():
                        if signum not in _PASSED_ON:
                            return f"the agent received {processes.signal_name(signum)}"
                        self._signal_workers(signum, "the agent")
                    self._reap()
                elif kind == "control":
                    self._from_worker_control(who)
                else:
                    self._from_worker_pipe(key.fd, who, kind)
            self._flush_logs()
            now = time.monotonic()
            silent = now - self.channel.last_received
            if silent > self.heartbeat_timeout and not self.channel.has_unread():
                return f"the launcher was silent for {silent:.0f} s (its host down, or the network cut?)"
            if now - self.channel.last_sent >= HEARTBEAT_S:
                self.channel.send(Beat())

    def _from_launcher(self) -> str | None:
        """Handle one message; a reason to stop ("" when asked to), or None to go on."""
        try:
            message, payload = self.channel.recv()
        except ChannelClosed as e:
            return f"its connection to the launcher {e.how()}"
        match message:
            case StartWorkers(workers):
                self._start_workers(workers, payload)
            case DumpStacks():
                for worker in self.workers.values():
                    with contextlib.suppress(ChannelClosed, OSError):
                        worker.control.send(ReportProgress())
            case Signal(signum):
                self._signal_workers(signum, "the launcher")
            case EndRun():
                self._end_run()
            case Stop():
                return ""
            case ForWorkers(local_ranks, passed_on):  # the launcher speaking to workers (the debugger)
                for worker in self.workers.values():
                    if worker.pid not in self.ended and (not local_ranks or worker.spec.local_rank in local_ranks):
                        with contextlib.suppress(ChannelClosed, OSError):
                            worker.control.send(passed_on)
        return None

    def _signal_workers(self, signum: int, receiver: str) -> None:
        """Send `signum` to every worker still running (the worker, not its children: a data
        loader's process has no use for a checkpoint request, and would die of one it does not
        handle)."""
        running = [w for pid, w in self.workers.items() if pid not in self.ended]
        if not running:
            return
        ranks = ", ".join(str(w.spec.rank) for w in running)
        self._agent_log(f"{receiver} received {processes.signal_name(signum)}: sent on to worker rank(s) {ranks}")
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _start_workers(self, specs: tuple[WorkerSpec, ...], payload: bytearray) -> None:
        for spec in specs:
            with _passed_on_signals_default():
                worker = fork_worker(spec, payload)
            self.workers[worker.pid] = worker
            self.selector.register(worker.control.fileno(), selectors.EVENT_READ, ("control", worker))
            for fd, stream in ((worker.stdout, "stdout"), (worker.stderr, "stderr")):
                self.splitters[fd] = LineSplitter()
                self.selector.register(fd, selectors.EVENT_READ, (stream, worker))
            self._agent_log(f"started worker rank {spec.rank} (local rank {spec.local_rank}, pid {worker.pid})")
        self._reap()  # a worker may already be gone

    def _from_worker_control(self, worker: ForkedWorker) -> None:
        try:
            message, blob_len = worker.control.recv_header()
        except ChannelClosed as e:
            if _at_end(worker.control):  # the worker closed its end: it is ending
                self.selector.unregister(worker.control.fileno())
            else:
                self._kill_worker(worker, str(e))
            return
        except Exception as e:  # a header that does not unpickle: garbage written into the socket
            self._kill_worker(worker, f"{type(e).__name__}: {e}")
            return
        match message:
            case WorkerLog(created, level, logger, text):
                self._read_output_now(worker)  # what it printed before logging this comes first
                self.pending_logs.append(LogLine(created, worker.spec.local_rank, "logging", level, text, logger))
            case _:  # a result, an exception or a stall: relayed untouched (the blob is the launcher's to decode)
                self._flush_logs()
                if not self.channel.forward(message, blob_len, worker.control):
                    self.channel.send(DiscardResult(worker.spec.local_rank))  # the worker died mid-send

    def _kill_worker(self, worker: ForkedWorker, problem: str) -> None:
        """Kill a worker whose control socket is out of step (a frame too large, or garbled): it
        would otherwise block forever writing the rest of it, and its peers with it."""
        self.selector.unregister(worker.control.fileno())
        spec = worker.spec
        because = f"it sent a malformed or oversize message ({problem})"
        if worker.pid in self.ended:  # reaped already: its pid may be another process's by now
            self._agent_log(f"worker rank {spec.rank} (local rank {spec.local_rank}) ended; {because}", logging.ERROR)
            return
        worker.killed_because = because
        self._agent_log(
            f"killing worker rank {spec.rank} (local rank {spec.local_rank}) because {because}", logging.ERROR
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)

    def _read_output_now(self, worker: ForkedWorker) -> None:
        """Take what is in the worker's pipes already: lines and log records arrive by two ways
        (pipes, the control socket), and a record must not overtake a line printed before it."""
        for fd, stream in ((worker.stdout, "stdout"), (worker.stderr, "stderr")):
            for _ in range(_MAX_DRAIN_READS):
                if fd not in self.splitters or not self._from_worker_pipe(fd, worker, stream):
                    break

    def _from_worker_pipe(self, fd: int, worker: ForkedWorker, stream: str) -> bool:
        """Read once from a worker's pipe; False if it had nothing to read right now."""
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return False
        splitter = self.splitters[fd]
        self._add_lines(worker, stream, splitter.feed(data) if data else splitter.flush())
        if not data:
            self.selector.unregister(fd)
            os.close(fd)
            del self.splitters[fd]
        return True

    def _drain_wakeups(self) -> list[int]:
        """The signals that arrived since last time (the pipe holds one byte per signal): those
        to pass on, and those that stop the agent. The latter have a handler that stops the agent
        already, but under load CPython (3.11) may never run it: one that came while a worker
        was being forked was seen to be lost. Their byte in this pipe is not."""
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._wake_r, 4096):
                data += chunk
        return [signum for signum in dict.fromkeys(data) if signum in (*_PASSED_ON, *_STOPPING)]

    def _reap(self) -> None:
        for pid, status in processes.reap_children().items():
            worker = self.workers.get(pid)
            if worker is None:
                continue  # an orphaned grandchild, re-parented to us
            self.ended.add(pid)
            self._drain_worker(worker)
            how = processes.describe_wait_status(status)
            if worker.killed_because:
                how += f": the agent killed it because {worker.killed_because}"
            spec = worker.spec
            level = logging.INFO if how == "exit code 0" else logging.ERROR
            self._agent_log(f"worker rank {spec.rank} (local rank {spec.local_rank}) ended: {how}", level)
            self._flush_logs()
            self.channel.send(WorkerExited(spec.local_rank, how))

    def _drain_worker(self, worker: ForkedWorker) -> None:
        """Everything a worker wrote before it died is read before its death is reported."""
        while worker.control.fileno() in self.selector.get_map():
            ready = selectors.DefaultSelector()
            ready.register(worker.control.fileno(), selectors.EVENT_READ)
            has_data = bool(ready.select(0))
            ready.close()
            if not has_data:
                break
            self._from_worker_control(worker)
        for fd, stream in ((worker.stdout, "stdout"), (worker.stderr, "stderr")):
            # Until the pipe is empty (or closed), but bounded: a child of the worker may
            # still hold the pipe and keep writing; the selector loop takes over from here.
            for _ in range(_MAX_DRAIN_READS):
                if fd not in self.splitters or not self._from_worker_pipe(fd, worker, stream):
                    break
                self._flush_logs()

    def _flush_partial_lines(self, worker: ForkedWorker) -> None:
        """Emit what a dead worker wrote without a final newline (its pipe may stay open)."""
        for fd, stream in ((worker.stdout, "stdout"), (worker.stderr, "stderr")):
            if fd in self.splitters:
                self._add_lines(worker, stream, self.splitters[fd].flush())

    def _add_lines(self, worker: ForkedWorker, stream: str, lines: list[str]) -> None:
        now, local_rank = time.time(), worker.spec.local_rank
        self.pending_logs.extend(LogLine(now, local_rank, stream, logging.INFO, line, "") for line in lines)

    # -- output -----------------------------------------------------------------------
    def log(self, message: str) -> None:
        """A message of the agent itself, for its log (sent with the next batch of lines)."""
        self._agent_log(message)

    def _agent_log(self, message: str, level: int = logging.INFO) -> None:
        self.pending_logs.append(LogLine(time.time(), None, "agent", level, message, ""))

    def _flush_logs(self) -> None:
        if self.pending_logs:
            lines, self.pending_logs = self.pending_logs, []
            for batch in _batches(lines):
                self.channel.send(Logs(batch))

    # -- teardown ---------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Kill every process we started, forward what they wrote, and say we stopped (and why).

        Workers that already died on their own are reported first, with their real exit
        status: a crash is usually the cause of the errors its peers raise.
        """
        if reason:
            self._agent_log(f"stopping: {reason}", logging.ERROR)
        self._kill_workers()
        self.channel.send(AgentStopped(reason))

    def _end_run(self) -> None:
        """In a warm session: kill what is left of the run (workers, their children, its store),
        forward what they wrote, forget them, and tell the launcher we are ready for the next run."""
        self._kill_workers(keep=self.stores.processes() if self.stores is not None else frozenset())
        for worker in self.workers.values():
            self._forget(worker)
        self.workers.clear()
        self.ended.clear()
        port = self.stores.next_port(ahead=True) if self.stores is not None else 0
        rss = processes.resident_memory(os.getpid())
        self._agent_log(f"run ended; idle, holding {rss / 2**20:.0f} MiB (resident) and no GPU context")
        self._flush_logs()
        self.channel.send(RunEnded(port))

    def _forget(self, worker: ForkedWorker) -> None:
        for fd in (worker.stdout, worker.stderr):
            if fd in self.splitters:
                self.selector.unregister(fd)
                os.close(fd)
                del self.splitters[fd]
        if worker.control.fileno() in self.selector.get_map():
            self.selector.unregister(worker.control.fileno())
        worker.control.close()

    def _kill_workers(self, keep: frozenset[int] = frozenset()) -> None:
        """Kill every process we started (but those in `keep`) and forward what they wrote;
        workers that already died on their own are reported first, with their real exit status."""
        self._reap()
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        processes.kill_descendants(keep=keep)
        for worker in self.workers.values():
            self._drain_worker(worker)
            self._flush_partial_lines(worker)
        self._flush_logs()

    def close(self) -> None:
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


def _at_end(channel: Channel) -> bool:
    """Whether the peer of `channel` has closed it (or reset it), as opposed to being still there
    with more to say."""
    try:
        return channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _batches(lines: list[LogLine]) -> Iterator[tuple[LogLine, ...]]:
    """`lines` in consecutive batches of at most `_MAX_BATCH_CHARS` characters of text (or one
    line, if longer), each one `Logs` frame: well under the limit of a frame's message, whatever
    the lines (a flood of output, big logging records)."""
    start, size = 0, 0
    for i, line in enumerate(lines):
        length = len(line.message) + len(line.logger)
        if size + length > _MAX_BATCH_CHARS and i > start:
            yield tuple(lines[start:i])
            start, size = i, 0
        size += length
    yield tuple(lines[start:])


@contextlib.contextmanager
def _passed_on_signals_default() -> Iterator[None]:
    """Fork a worker with SIGUSR1 and SIGUSR2 at their default action, as in any fresh process:
    a worker without handlers of its own must die of them, not run the agent's. They are blocked
    meanwhile, so one that comes in between reaches the agent's handler afterwards."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _PASSED_ON)
    previous = {signum: signal.signal(signum, signal.SIG_DFL) for signum in _PASSED_ON}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PASSED_ON)


def _unblock_passed_on() -> None:
    """In a forked worker: the signals blocked around the fork are its to receive."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PASSED_ON)
