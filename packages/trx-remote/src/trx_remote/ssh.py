"""The SSH executor: agents on other hosts, started over SSH with paramiko.

Hosts are reached as the OpenSSH-format config (``ssh_config_file``, default
``~/.ssh/config``) says (`trx_remote.ssh_config`), over connections that check host keys
(`trx_remote.ssh_connection`).

Each agent runs in a session of its own on its host (``setsid``), attached to one SSH exec
channel: its exit status and last output come back on that channel. Its environment and the
run's secret travel on that channel's stdin (``scripts/ssh_wrapper.sh``), never on a command
line. Stopping is the reaper's job (``scripts/reaper.sh``): started next to the agent over
the same connection, it kills every process of the agent's session and every process carrying
the agent's mark, so the agent's workers and their children go too, even after the agent
itself was SIGKILLed, and also when the launcher's connection is lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import threading
import time
import warnings
from collections.abc import Mapping

import paramiko

from trx_core import AgentFailedError, AgentSpec, ExecutorSettings

from .addresses import AddressError, route_source_address
from .command import agent_argv, agent_mark, describe_end, load_script
from .ssh_config import SSHHost, load_ssh_config, route, ssh_host
from .ssh_connection import SSHConnection, SSHError, explain

__all__ = ["SSHAgentProcess", "SSHError", "SSHExecutor", "SSHHost", "load_ssh_config", "ssh_host"]

_SESSION_MARKER = b"torchrunx-agent-session "  # printed by ssh_wrapper.sh
_STOP_GRACE_S = 1.0  # for the agent to stop its workers after SIGTERM; then everything is SIGKILLed
_OUTPUT_TAIL = 4000
_WRAPPER_SCRIPT = load_script("ssh_wrapper.sh")
_REAPER_SCRIPT = load_script("reaper.sh")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BASH_READ_ONLY = frozenset({"BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID"})


class SSHAgentProcess:
    """An agent started over SSH, in its own session on its host."""

    def __init__(
        self, host: SSHHost, connection: SSHConnection, channel: paramiko.Channel, python: str, mark: str
    ) -> None:
        self.host = host
        self._python = python
        self._mark = mark
        self._reaper: paramiko.Channel | None = None
        self._connection = connection
        self._channel = channel
        self._ended_r, self._ended_w = os.pipe()
        self._session: int | None = None
        self._status: int | None = None
        self._output = bytearray()
        self._have_session = threading.Event()
        self._ended = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._reader = threading.Thread(target=self._follow, name=f"torchrunx-ssh-{host.alias}", daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        """Read the agent's output until its channel closes; keep the tail; note the exit status."""
        pending = b""
        try:
            while data := self._channel.recv(1 << 16):
                if self._session is None:  # a login banner or shell startup file may print first
                    pending += data
                    while self._session is None and b"\n" in pending:
                        line, _, pending = pending.partition(b"\n")
                        if line.startswith(_SESSION_MARKER):
                            self._session = int(line[len(_SESSION_MARKER) :])
                            self._have_session.set()
                        else:
                            self._output += line + b"\n"
                    if self._session is None:
                        continue
                    data, pending = pending, b""
                self._output += data
                del self._output[:-_OUTPUT_TAIL]
            self._status = self._channel.recv_exit_status()
        except Exception as e:  # the connection broke
            self._output += f"\n{type(e).__name__}: {e}".encode()
            self._status = -1
        finally:
            self._ended.set()
            self._have_session.set()
            os.write(self._ended_w, b"x")

    def wait_started(self, timeout: float) -> None:
        """Block until the remote side has started the agent's session (or has failed)."""
        if not self._have_session.wait(timeout):
            raise SSHError(f"{self.host}: the agent command did not start within {timeout:g} s")
        if self._session is None:
            raise SSHError(f"{self.host}: could not start the agent: {self.poll()}")

    def fileno(self) -> int:
        return self._ended_r

    def poll(self) -> str | None:
        if not self._ended.is_set():
            return None
        tail = self._output.decode("utf-8", "replace").strip()
        status = self._status if self._status is not None else -1
        if status == -1:
            return "the agent lost its SSH connection (no exit status)" + (f": {tail}" if tail else "")
        if "did not exit normally" in tail:  # setsid --wait: the agent died by a signal, `status`
            tail = "\n".join(line for line in tail.splitlines() if "did not exit normally" not in line)
            status = -status
        return describe_end(status, tail, self._python)

    def start_reaper(self) -> None:
        """Start the reaper that `stop` (or the connection's end) sets off."""
        channel = self._connection.transport.open_session(timeout=_STOP_GRACE_S)
        ticks = str(int(_STOP_GRACE_S / 0.02))
        channel.exec_command(shlex.join(["bash", "-c", _REAPER_SCRIPT, "torchrunx-reaper", ticks]))
        channel.sendall(f"{self._mark}\n".encode())
        self._reaper = channel

    def stop(self) -> None:
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            # A host that does not answer the reaper is cut off or down: waiting longer for its
            # agent to end is pointless (it stops itself once it misses the launcher's heartbeats).
            if self._connection.transport.is_active() and self._reap():
                self._ended.wait(_STOP_GRACE_S)
        finally:
            self._connection.close()
            self._reader.join(_STOP_GRACE_S)
            if not self._reader.is_alive():
                os.close(self._ended_r)
                os.close(self._ended_w)
            # else: the pipe stays open rather than be closed under a thread that may write to it

    def _reap(self) -> bool:
        """Have the reaper kill the agent's processes; True if it said it did."""
        try:
            if self._reaper is None:  # it could not be started in advance
                self.start_reaper()
            assert self._reaper is not None
            self._reaper.sendall(f"{self._session or ''}\n".encode())
            self._reaper.shutdown_write()
            return bool(self._reaper.status_event.wait(_STOP_GRACE_S + 0.5))
        except Exception:
            return False  # the host is gone or the connection broke; nothing more we can do from here


class SSHExecutor:
    """Starts agents over SSH, as the ssh config of `settings` says (default ``~/.ssh/config``)."""

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        self.config = load_ssh_config((settings or ExecutorSettings()).ssh_config_file)
        self._addresses: dict[str, str] = {}

    def host(self, hostname: str) -> SSHHost:
        """How `hostname` is reached, per the ssh config."""
        return ssh_host(self.config, hostname)

    def launcher_address(self, hostname: str) -> str:
        """This machine's address on the route to `hostname` (or, through jump hosts, to the first one)."""
        if hostname not in self._addresses:
            hops = route(self.config, hostname)
            target = hops[-1]
            errors = []
            for address in dict.fromkeys([target.hostname, hops[0].hostname]):
                try:
                    self._addresses[hostname] = route_source_address(address, target.port)
                    break
                except AddressError as e:
                    errors.append(str(e))
            else:
                raise AgentFailedError(
                    hostname,
                    f"{'; '.join(errors)}. Check HostName in the ssh config, or set Launcher.launcher_address "
                    "to the address at which this host reaches the launcher",
                )
        return self._addresses[hostname]

    def start(self, spec: AgentSpec) -> SSHAgentProcess:
        """Connect to the host (through its jump hosts), start the agent, and return it.

        Bounded by the hosts' ConnectTimeout (plus a few seconds to start the command).
        """
        hops = route(self.config, spec.hostname)
        target = hops[-1]
        budget = sum(h.connect_timeout for h in hops) + 3.0
        started = time.monotonic()
        connection = SSHConnection()
        try:
            with connection.deadline(budget):
                connection.connect(hops)
                channel = connection.transport.open_session(timeout=target.connect_timeout)
                channel.set_combine_stderr(True)
                mark_var, mark = agent_mark()
                channel.exec_command(_remote_command(spec).encode("utf-8", "surrogateescape"))
                channel.sendall(_environment_block({**spec.env, mark_var: mark}, spec.hostname) + spec.stdin)
                channel.shutdown_write()
                process = SSHAgentProcess(target, connection, channel, spec.python, f"{mark_var}={mark}")
                with contextlib.suppress(paramiko.SSHException):  # e.g. MaxSessions 1: started when needed
                    process.start_reaper()
                process.wait_started(max(budget - (time.monotonic() - started), 1.0))
        except SSHError:
            connection.close()
            raise
        except Exception as e:
            connection.close()
            raise SSHError(f"{target}: {explain(e, target, connection.expired)}") from None
        return process


def _remote_command(spec: AgentSpec) -> str:
    """The command line for the remote login shell: a new session, the wrapper that reads the
    environment from stdin, then the agent command. It holds no value of the environment."""
    argv = ["setsid", "--wait", "bash", "-c", _WRAPPER_SCRIPT, "torchrunx-agent", *agent_argv(spec)]
    return "exec " + shlex.join(argv)


def _environment_block(env: Mapping[str, str], hostname: str) -> bytes:
    """`env` as ssh_wrapper.sh reads it: NUL-terminated NAME=VALUE entries, then an empty one.

    Bytes as the launcher has them (``os.fsencode``), so any value arrives byte-for-byte.
    """
    entries = []
    for name, value in env.items():
        if not _SHELL_NAME.fullmatch(name) or name in _BASH_READ_ONLY:
            warnings.warn(
                f"environment variable {name!r} is not sent to host {hostname!r}: bash cannot export it",
                stacklevel=2,
            )
            continue
        entries.append(os.fsencode(name) + b"=" + os.fsencode(value) + b"\0")
    return b"".join(entries) + b"\0"
