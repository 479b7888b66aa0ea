"""The agent: one per host, started by an executor as ``python -m trx_core.agent``.

It connects back to the launcher (authenticating with the run's secret, read from standard
input), imports torch once, forks the host's workers on request, and relays their results,
exceptions, exit statuses and output to the launcher as they happen. It is single-threaded
and event-driven: one selector over the launcher connection, the workers' sockets and
pipes, and a wake-up pipe for SIGCHLD.

When the launcher says stop, or its connection breaks, or the agent is told to terminate,
every process the agent started (workers and their children, including orphans, since the
agent is a child subreaper) is killed and reaped before it exits.

Messages to the launcher: ``hello``, ``logs``, ``result``, ``error``, ``discard`` (of a
result or error cut short by its worker's death), ``exit``, ``stopped``.
Messages from the launcher: ``start`` (with the payload), ``stop``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any

from . import _proc
from .channel import HEARTBEAT_S, AuthenticationFailed, Channel, ChannelClosed, client_handshake
from .worker import ForkedWorker, WorkerLaunch, fork_worker

EXIT_NO_LAUNCHER = 2
_READ_SIZE = 1 << 16
_MAX_LINE = 1 << 16
_MAX_DRAIN_READS = 256  # 16 MiB

# A record as it travels: (time, local_rank, stream, level, message, logger)
Record = tuple[float, int | None, str, int, str, str]


class _Terminate(Exception):
    pass


def _raise_terminate(signum: int, frame: Any) -> None:
    raise _Terminate(_proc.signal_name(signum))


class _LineSplitter:
    """Cuts a worker's byte stream into text lines, for one record per line.

    ``\n`` ends a line (blank lines are kept: they are output too). A carriage return also
    ends a line, so each state of a progress bar (tqdm) becomes a readable record as soon as
    it is drawn, and blank pieces between carriage returns (a bar erasing itself) are
    dropped. ``\r\n`` is one line end even when split across two reads. A line longer than
    `_MAX_LINE` bytes is cut (at a UTF-8 character boundary), so no line holds memory unbounded.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._after_cr = False

    def feed(self, data: bytes) -> list[str]:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        if data:
            self._after_cr = data.endswith(b"\r")
        *lines, rest = (self._pending + data).split(b"\n")
        pieces: list[bytes] = []
        for line in lines:
            pieces.extend(_cr_pieces(line) if b"\r" in line else (line,))
        if b"\r" in rest:
            done, _, rest = rest.rpartition(b"\r")
            pieces.extend(_cr_pieces(done))
        while len(rest) > _MAX_LINE:
            cut = _utf8_boundary(rest, _MAX_LINE)
            pieces.append(rest[:cut])
            rest = rest[cut:]
        self._pending = rest
        return [p.decode("utf-8", "backslashreplace") for p in pieces]

    def flush(self) -> list[str]:
        """The unterminated rest of the stream (at its end, or when its writer is gone)."""
        rest, self._pending = self._pending, b""
        return [rest.decode("utf-8", "backslashreplace")] if rest.strip() else []


def _cr_pieces(line: bytes) -> list[bytes]:
    return [p for p in line.split(b"\r") if p.strip()]


def _utf8_boundary(data: bytes, limit: int) -> int:
    cut = limit
    while cut > limit - 4 and (data[cut] & 0xC0) == 0x80:  # a continuation byte: back up
        cut -= 1
    return cut if cut > limit - 4 else limit


class Agent:
    """The agent's state and event loop. Owns every worker it forks."""

    def __init__(self, launcher: Channel, heartbeat_timeout: float) -> None:
        self.launcher = launcher
        self.heartbeat_timeout = heartbeat_timeout
        self.selector = selectors.DefaultSelector()
        self.workers: dict[int, ForkedWorker] = {}  # by pid
        self.splitters: dict[int, _LineSplitter] = {}  # by pipe fd
        self.pending_logs: list[Record] = []
        self.statuses: dict[int, int] = {}
        wake_r, self._wake_w = os.pipe()
        self._wake_r = wake_r
        for fd in (wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.selector.register(launcher.fileno(), selectors.EVENT_READ, ("launcher", None))
        self.selector.register(wake_r, selectors.EVENT_READ, ("wake", None))

    # -- events -----------------------------------------------------------------------
    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        while True:
            for key, _ in self.selector.select(HEARTBEAT_S):
                if self.selector.get_map().get(key.fileobj) is not key:
                    continue  # closed while an earlier event of this batch was handled
                kind, who = key.data
                if kind == "launcher":
                    if not self._from_launcher():
                        return
                elif kind == "wake":
                    self._drain_wakeups()
                    self._reap()
                elif kind == "control":
                    self._from_worker_control(who)
                else:
                    self._from_worker_pipe(key.fd, who, kind)
            self._flush_logs()
            now = time.monotonic()
            if now - self.launcher.last_received > self.heartbeat_timeout:
                return  # the launcher's host is gone or cut off: nobody is left to report to
            if now - self.launcher.last_sent >= HEARTBEAT_S:
                self.launcher.send(("beat",))

    def _from_launcher(self) -> bool:
        try:
            header, blob = self.launcher.recv()
        except ChannelClosed:
            return False  # the launcher is gone: tear down
        if header[0] == "start":
            self._start_workers(header[1], blob)
            return True
        if header[0] == "dump":  # a rank looks hung: each worker logs its stack, says how long it is stuck
            for worker in self.workers.values():
                with contextlib.suppress(ChannelClosed, OSError):
                    worker.control.send(("report",))
            return True
        if header[0] == "stop":
            self.stop()
            self.launcher.send(("stopped",))
            return False
        return True

    def _start_workers(self, launches: list[WorkerLaunch], payload: bytearray) -> None:
        for launch in launches:
            worker = fork_worker(launch, payload)
            self.workers[worker.pid] = worker
            self.selector.register(worker.control.fileno(), selectors.EVENT_READ, ("control", worker))
            for fd, stream in ((worker.stdout, "stdout"), (worker.stderr, "stderr")):
                self.splitters[fd] = _LineSplitter()
                self.selector.register(fd, selectors.EVENT_READ, (stream, worker))
            self._agent_log(f"started worker rank {launch.rank} (local rank {launch.local_rank}, pid {worker.pid})")
        self._reap()  # a worker may already be gone

    def _from_worker_control(self, worker: ForkedWorker) -> None:
        try:
            header, blob_len = worker.control.recv_header()
        except ChannelClosed:
            self.selector.unregister(worker.control.fileno())
            return
        kind = header[0]
        if kind == "log":
            _, created, level, logger, message = header
            self.pending_logs.append((created, worker.launch.local_rank, "logging", level, message, logger))
        else:  # "result" / "error": relayed untouched; the blob is only decoded by the launcher
            self._flush_logs()
            if not self.launcher.forward(header, blob_len, worker.control):
                self.launcher.send(("discard", worker.launch.local_rank))  # the worker died mid-send

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

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        for pid, status in _proc.reap_children().items():
            worker = self.workers.get(pid)
            if worker is None:
                continue  # an orphaned grandchild, re-parented to us
            self._drain_worker(worker)
            how = _proc.describe_wait_status(status)
            launch = worker.launch
            level = logging.INFO if how == "exit code 0" else logging.ERROR
            self._agent_log(f"worker rank {launch.rank} (local rank {launch.local_rank}) ended: {how}", level)
            self._flush_logs()
            self.launcher.send(("exit", worker.launch.local_rank, how))

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
        now, local_rank = time.time(), worker.launch.local_rank
        self.pending_logs.extend((now, local_rank, stream, logging.INFO, line, "") for line in lines)

    # -- output -----------------------------------------------------------------------
    def _agent_log(self, message: str, level: int = logging.INFO) -> None:
        self.pending_logs.append((time.time(), None, "agent", level, message, ""))

    def _flush_logs(self) -> None:
        if self.pending_logs:
            records, self.pending_logs = self.pending_logs, []
            self.launcher.send(("logs", records))

    # -- teardown ---------------------------------------------------------------------
    def stop(self) -> None:
        """Kill every process we started, then forward what they wrote.

        Workers that already died on their own are reported first, with their real exit
        status: a crash is usually the cause of the errors its peers raise.
        """
        self._reap()
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        _proc.kill_descendants()
        for worker in self.workers.values():
            self._drain_worker(worker)
            self._flush_partial_lines(worker)
        self._flush_logs()

    def close(self) -> None:
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trx_core.agent", description=__doc__)
    parser.add_argument("--launcher", required=True, help="HOST:PORT of the launcher")
    parser.add_argument("--host-index", type=int, required=True)
    parser.add_argument("--connect-timeout", type=float, default=15.0)  # a LAN connects in ms; a DROP firewall never
    parser.add_argument("--heartbeat-timeout", type=float, default=15.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of an agent process. The run's secret (hex) is the first line of stdin."""
    args = _parse_args(argv)
    secret = bytes.fromhex(sys.stdin.readline().strip())
    _proc.become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_terminate)
    host, _, port = args.launcher.rpartition(":")
    agent: Agent | None = None
    try:
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=args.connect_timeout)
        except OSError as e:
            print(
                f"torchrunx: the agent on host {socket.gethostname()} cannot reach the launcher at "
                f"{args.launcher}: {e.strerror or e}. Check that this host can reach the launcher's machine "
                "(firewall, routes), or set Launcher.launcher_address to its address as seen from here.",
                file=sys.stderr,
            )
            return EXIT_NO_LAUNCHER
        try:
            client_handshake(sock, secret)
        except (ChannelClosed, AuthenticationFailed, OSError) as e:
            print(
                f"torchrunx: the launcher at {args.launcher} and the agent on host {socket.gethostname()} "
                f"do not share this run's secret ({e}): the agent is not one of this run's, or the "
                "address belongs to another program.",
                file=sys.stderr,
            )
            return EXIT_NO_LAUNCHER
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        launcher = Channel(sock)
        gpus = _import_torch()
        cpus = len(os.sched_getaffinity(0))
        launcher.send(("hello", args.host_index, socket.gethostname(), os.getpid(), gpus, cpus, _free_port()))
        agent = Agent(launcher, args.heartbeat_timeout)
        agent.serve()
    except (_Terminate, ChannelClosed):
        pass
    finally:
        # Tearing down already: a SIGTERM now (the executor's stop) must not cut the teardown short.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if agent is not None:
            with contextlib.suppress(ChannelClosed, OSError):
                agent.stop()
            agent.close()
        _proc.kill_descendants()
    return 0


def _free_port() -> int:
    """A port that is free on this host now, for runs whose workers bring their own rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _import_torch() -> int:
    """Import torch before any worker is forked, so no worker pays for it; count GPUs."""
    import torch
    import torch.distributed

    # Ask NVML rather than the CUDA runtime: this process must not initialise CUDA, or
    # the workers forked from it could not use their GPUs.
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.device_count()
    finally:
        if previous is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    # Skip interpreter finalisation (torch's teardown alone takes a few hundred ms): everything
    # we own is already closed, and the launcher is waiting for us to be gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
