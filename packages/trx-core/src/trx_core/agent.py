"""The agent: one per host, started by an executor as ``python -m trx_core.agent``.

It connects back to the launcher (authenticating with the run's secret, read from standard
input), imports torch once, forks the host's workers on request, and relays their results,
exceptions, exit statuses and output to the launcher as they happen. Agent 0 also hosts the
workers' rendezvous store, so that the launcher itself never needs torch. The agent is
single-threaded and event-driven: one selector over its connection to the launcher, the
workers' sockets and pipes, and a wake-up pipe for SIGCHLD. The messages are those of
`trx_core.protocol`.

When the launcher says stop, or its connection breaks, or the agent is told to terminate,
every process the agent started (workers and their children, including orphans, since the
agent is a child subreaper) is killed and reaped before it exits. When it stops on its own,
it says why (`AgentStopped`), to the launcher if it can still be reached and on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from . import processes
from ._agent_loop import AgentLoop
from .channel import HEARTBEAT_S, AuthenticationFailed, Channel, ChannelClosed, client_handshake
from .protocol import AgentStopped, Beat, Hello, Ready

EXIT_NO_LAUNCHER = 2
_STORE_TIMEOUT_S = 600  # the store's own operations; workers connect with the run's timeout


class _Terminate(Exception):
    pass


_launcher_gone = ""  # set by the launcher watch before it signals this process


def _raise_terminate(signum: int, frame: Any) -> None:
    raise _Terminate(_launcher_gone or f"the agent received {processes.signal_name(signum)}")


def _watch_launcher(identity: str | None) -> None:
    """Stop at once if the launcher is our parent and it exits, even while another process
    (a child the user's program forked) keeps our connection to it open.

    `identity` is the launcher's ``PID:START_TIME``. It only counts if our parent is that very
    process (the local executor's case); elsewhere heartbeats and the executor cover a lost launcher.
    """
    if not identity:
        return
    pid = os.getppid()
    if identity != processes.identity(pid):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return

    def watch() -> None:
        global _launcher_gone
        processes.leave_signals_to_the_main_thread()
        select.select([pidfd], [], [])
        _launcher_gone = f"the launcher (pid {pid}) exited"
        os.kill(os.getpid(), signal.SIGHUP)

    threading.Thread(target=watch, name="torchrunx-launcher-watch", daemon=True).start()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trx_core.agent", description=__doc__)
    parser.add_argument("--launcher", required=True, help="HOST:PORT of the launcher")
    parser.add_argument("--host-index", type=int, required=True)
    parser.add_argument("--connect-timeout", type=float, default=15.0)  # a LAN connects in ms; a DROP firewall never
    parser.add_argument("--heartbeat-timeout", type=float, default=15.0)
    parser.add_argument("--launcher-process", default=None, help="PID:START_TIME of the launcher")
    parser.add_argument(
        "--store-host",
        default=None,
        help="host the workers' rendezvous store here ('route': our address to the launcher)",
    )
    return parser.parse_args(argv)


def _connect(args: argparse.Namespace, secret: bytes) -> Channel | None:
    """Connect to the launcher and authenticate; None (having said why on stderr) if we cannot."""
    host, _, port = args.launcher.rpartition(":")
    here = socket.gethostname()
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=args.connect_timeout)
    except OSError as e:
        print(
            f"torchrunx: the agent on host {here} cannot reach the launcher at {args.launcher}: "
            f"{e.strerror or e}. Check that this host can reach the launcher's machine (firewall, routes), "
            "or set Launcher.launcher_address to its address as seen from here.",
            file=sys.stderr,
        )
        return None
    try:
        client_handshake(sock, secret)
    except (ChannelClosed, AuthenticationFailed, OSError) as e:
        sock.close()
        print(
            f"torchrunx: the launcher at {args.launcher} and the agent on host {here} do not share this run's "
            f"secret ({e}): the agent is not one of this run's, or the address belongs to another program.",
            file=sys.stderr,
        )
        return None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(sock)


def main(argv: list[str] | None = None) -> int:
    """Entry point of an agent process. The run's secret (hex) is the first line of stdin."""
    args = _parse_args(argv)
    secret = bytes.fromhex(sys.stdin.readline().strip())
    processes.become_subreaper()
    # A blocked mask survives exec: what started us (a thread of the launcher, bash, sshd) must
    # not leave SIGTERM blocked here, or the agent could never be told to stop.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_terminate)
    _watch_launcher(args.launcher_process)
    channel: Channel | None = None
    agent: AgentLoop | None = None
    reason = ""
    try:
        channel = _connect(args, secret)
        if channel is None:
            return EXIT_NO_LAUNCHER
        connected = time.time()
        channel.send(Hello(args.host_index, socket.gethostname(), os.getpid()))
        # From here on a thread beats whenever the main thread sends nothing: while torch loads
        # (seconds, or minutes on NFS), and while a big frame is read or relayed (a minute over a slow link).
        with _beating(channel):
            gpus = _import_torch()
            hosts_store = args.store_host is not None
            stores = None
            if hosts_store:
                # "route": this host's address facing the launcher, which the other hosts reach too.
                bind = channel.sock.getsockname()[0] if args.store_host == "route" else args.store_host
                stores = StoreProcesses(bind)
                port = stores.next_port()
            else:
                port = _free_port()
            started = processes.started_at(os.getpid())
            channel.send(Ready(gpus, len(os.sched_getaffinity(0)), port, hosts_store, started, connected))
            agent = AgentLoop(channel, args.heartbeat_timeout, stores)
            agent.log(
                f"ready {time.time() - started:.2f} s after the agent started: connected to the launcher after "
                f"{connected - started:.2f} s, then imported torch{' and started the rendezvous store' * hosts_store}"
            )
            reason = agent.serve()
    except _Terminate as e:
        reason = str(e)
    except ChannelClosed:
        reason = "its connection to the launcher was lost"
    finally:
        # Tearing down already: a SIGTERM now (the executor's stop) must not cut the teardown short.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if reason:
            print(f"torchrunx: the agent on host {socket.gethostname()} stopped: {reason}", file=sys.stderr)
        if agent is not None:
            with contextlib.suppress(ChannelClosed, OSError):
                agent.stop(reason)
            agent.close()
        elif channel is not None:
            with contextlib.suppress(ChannelClosed, OSError):
                channel.send(AgentStopped(reason))
        processes.kill_descendants()  # the store's process too
    return 0


@contextlib.contextmanager
def _beating(channel: Channel) -> Iterator[None]:
    """Send heartbeats from a thread while the body runs, whenever the body sends nothing."""
    done = threading.Event()

    def beat() -> None:
        processes.leave_signals_to_the_main_thread()
        while not done.wait(HEARTBEAT_S / 4):
            channel.beat_if_quiet(Beat())

    thread = threading.Thread(target=beat, name="torchrunx-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _free_port() -> int:
    """A port that is free on this host now, for runs whose workers bring their own rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class StoreProcesses:
    """Agent 0's rendezvous stores, each in a process of its own (a child of this agent, which
    kills it when it stops), as torchrun's agent hosts its store: a fresh one for every run.

    Not in this process: the store's server runs threads, and a worker forked while one of them
    holds a lock (of malloc, say) would hang before it ever reached the store. In a warm session
    the store of the run after next is started as a run ends, so that it is ready when needed.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self._current = 0  # the process of the store in use
        self._spare: tuple[int, int] | None = None  # (pid, read end of the pipe that gives its port)

    def next_port(self, ahead: bool = False) -> int:
        """The port of a new store (the spare one, if started), the one in use killed (its
        process reaped with the agent's other children); `ahead`: start the next spare."""
        if self._current:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._current, signal.SIGKILL)
        pid, answer = self._spare if self._spare is not None else self._spawn()
        self._current = pid
        self._spare = self._spawn() if ahead else None
        with os.fdopen(answer, "rb") as f:
            port = f.read()
        if not port:
            raise RuntimeError(f"the rendezvous store could not be started on {self.host} (its process {pid} died)")
        return int(port)

    def processes(self) -> frozenset[int]:
        """The processes of the stores (in use, and spare), which `next_port` ends itself."""
        return frozenset({self._current, *(() if self._spare is None else (self._spare[0],))} - {0})

    def _spawn(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the store's process
            try:
                processes.die_with_parent(signal.SIGKILL)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                os.closerange(3, write_end)  # the launcher's connection above all: it is the agent's alone
                os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
                store = _start_store(self.host)
                os.write(write_end, str(store.port).encode())
                os.close(write_end)
                while True:
                    signal.pause()
            finally:
                os._exit(1)
        os.close(write_end)
        return pid, read_end


def _start_store(host: str) -> Any:
    """The rendezvous store, listening on `host` only: torch's own server would listen on every
    interface, so it is handed a socket bound here."""
    from datetime import timedelta

    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Port 0: the kernel picks a free port, and the store keeps it for the whole run.
    listener = socket.create_server((host, 0), family=family, backlog=1024)
    port = listener.getsockname()[1]
    reach = "127.0.0.1" if host == "0.0.0.0" else host  # where the store's own client connects
    timeout = timedelta(seconds=_STORE_TIMEOUT_S)
    try:
        store = dist.TCPStore(  # type: ignore[attr-defined]
            reach, port, None, True, timeout, wait_for_workers=False, master_listen_fd=listener.detach()
        )
    except TypeError:  # torch < 2.3 cannot take a socket: its server listens on every interface
        store = dist.TCPStore(reach, 0, None, True, timeout, wait_for_workers=False)  # type: ignore[attr-defined]
    return store


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
