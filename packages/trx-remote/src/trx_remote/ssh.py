"""The SSH executor: agents on other hosts, started over SSH with paramiko.

Hosts are reached as the OpenSSH-format config (``Launcher.ssh_config_file``, default
``~/.ssh/config``) says: HostName, Port, User, IdentityFile, IdentitiesOnly, ProxyJump,
ProxyCommand, ConnectTimeout, StrictHostKeyChecking, UserKnownHostsFile,
GlobalKnownHostsFile. Host keys are checked against the known_hosts files unless the config
says ``StrictHostKeyChecking no`` (or ``accept-new``, which also records new keys).

Each agent runs in a session of its own on its host (``setsid``), attached to one SSH exec
channel: its exit status and last output come back on that channel. Stopping kills every
process of that session over a second channel of the same connection, so the agent's
workers and their children go too, even after the agent itself was SIGKILLed.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from trx_core import AgentFailedError, AgentSpec, ConfigurationError

from .addresses import AddressError, route_source_address
from .command import AGENT_SCRIPT, describe_end

if TYPE_CHECKING:
    from trx_core import Launcher

__all__ = ["SSHAgentProcess", "SSHError", "SSHExecutor", "SSHHost", "load_ssh_config", "ssh_host"]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
"""Used when the config sets no ConnectTimeout (OpenSSH would wait for the kernel's TCP timeout)."""

_SESSION_MARKER = b"torchrunx-agent-session "
_STOP_GRACE_S = 1.0  # for the agent to stop its workers after SIGTERM; then everything is SIGKILLed
_OUTPUT_TAIL = 4000

# Prints the session id (= its own pid, after setsid) so that `stop` can kill the session.
_REMOTE_SCRIPT = f"printf '{_SESSION_MARKER.decode()}%s\\n' \"$$\"\n" + AGENT_SCRIPT

# Every process started for an agent carries this variable, set to a token of that agent:
# processes that left its session (a worker's child calling setsid) are found by it.
_MARK_VAR = "TORCHRUNX_SSH_AGENT"

# The reaper: started next to each agent, over the same connection, it waits for a line on
# stdin. `stop` sends the agent's session id: SIGTERM first (the agent kills its workers and
# exits). End of input (the launcher died, the connection broke) means the same, without the
# courtesy. Then SIGKILL whatever is left in the session or carries the agent's mark:
# workers' children, or everything if the agent was SIGKILLed and could not clean up. Twice,
# for what was forked during the first sweep. Started in advance, it is ready the moment it
# is needed: a new SSH session costs a login shell's start-up (~0.3 s with pyenv or conda).
# $1 = the agent's mark.
_REAPER_SCRIPT = f"""\
mark="{_MARK_VAR}=$1"
read -r sid
if [ -n "$sid" ] && kill -TERM "$sid" 2>/dev/null; then
  for _ in $(seq {int(_STOP_GRACE_S * 50)}); do kill -0 "$sid" 2>/dev/null || break; sleep 0.02; done
fi
for sweep in 1 2; do
  for dir in /proc/[0-9]*; do
    read -r line < "$dir/stat" || continue
    set -- ${{line##*) }}
    [ -n "$sid" ] && [ "$4" = "$sid" ] && kill -KILL "${{dir#/proc/}}"
  done
  for file in $(grep -lzxF -- "$mark" /proc/[0-9]*/environ); do
    pid=${{file#/proc/}}
    kill -KILL "${{pid%/environ}}"
  done
done 2>/dev/null
exit 0
"""


class SSHError(ConnectionError):
    """A host could not be reached, or refused us; the message names the host and the cause."""


@dataclass(frozen=True)
class SSHHost:
    """How to reach one host, as the ssh config says."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    proxy_jump: tuple[str, ...]
    proxy_command: str | None
    connect_timeout: float
    strict_host_key_checking: str
    known_hosts_files: tuple[str, ...]

    def __str__(self) -> str:
        via = f" via {','.join(self.proxy_jump)}" if self.proxy_jump else ""
        return f"{self.alias!r} ({self.user}@{self.hostname}:{self.port}{via})"


def load_ssh_config(path: str | os.PathLike[str] | None) -> paramiko.SSHConfig:
    """The ssh config at `path`; None means ``~/.ssh/config`` if it exists, else an empty one."""
    if path is None:
        default = Path("~/.ssh/config").expanduser()
        return paramiko.SSHConfig.from_path(str(default)) if default.is_file() else paramiko.SSHConfig()
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigurationError(f"ssh_config_file {str(path)!r} does not exist or is not a file")
    try:
        return paramiko.SSHConfig.from_path(str(file))
    except Exception as e:
        raise ConfigurationError(f"cannot parse ssh_config_file {str(path)!r}: {e}") from e


def ssh_host(config: paramiko.SSHConfig, alias: str, *, user: str | None = None, port: int | None = None) -> SSHHost:
    """Look `alias` up in `config`; `user` and `port` (from a ProxyJump entry) take precedence."""
    options = config.lookup(alias)
    try:
        timeout = float(options.get("connecttimeout", DEFAULT_CONNECT_TIMEOUT_S))
        port = port or int(options.get("port", 22))
    except ValueError as e:
        raise ConfigurationError(f"ssh config for host {alias!r}: {e}") from None
    jump = options.get("proxyjump", "none")
    known_hosts = options.get("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2").split()
    known_hosts += options.get("globalknownhostsfile", "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2").split()
    proxy_command = options.get("proxycommand")
    return SSHHost(
        alias=alias,
        hostname=options.get("hostname", alias),
        port=port,
        user=user or options.get("user") or getpass.getuser(),
        identity_files=tuple(os.path.expanduser(f) for f in options.get("identityfile", [])),
        identities_only=options.get("identitiesonly", "no").lower() == "yes",
        proxy_jump=() if jump.lower() == "none" else tuple(j.strip() for j in jump.split(",") if j.strip()),
        proxy_command=None if proxy_command is None or proxy_command.lower() == "none" else proxy_command,
        connect_timeout=timeout,
        strict_host_key_checking=options.get("stricthostkeychecking", "yes").lower(),
        known_hosts_files=tuple(os.path.expanduser(f) for f in known_hosts),
    )


def _parse_jump(entry: str) -> tuple[str, str | None, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` -> (host, user, port)."""
    entry = entry.removeprefix("ssh://")
    user, _, hostport = entry.rpartition("@")
    host, port = hostport, None
    if hostport.startswith("["):  # [v6addr]:port
        host, _, rest = hostport[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
        port = int(port_text)
    return host, user or None, port


class _AcceptNewHostKey(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """``StrictHostKeyChecking accept-new``: trust a host seen for the first time, and remember it."""

    def __init__(self, known_hosts: str | None) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        if self.known_hosts:
            try:
                Path(self.known_hosts).parent.mkdir(parents=True, exist_ok=True)
                with open(self.known_hosts, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            except OSError:
                pass  # remembered for this run only


def _host_key_policy(client: paramiko.SSHClient, host: SSHHost) -> None:
    for path in host.known_hosts_files:
        if path != "/dev/null" and os.path.isfile(path):
            client.load_system_host_keys(path)
    mode = host.strict_host_key_checking
    if mode in ("no", "off"):
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # in memory only: nothing is saved
    elif mode == "accept-new":
        writable = [p for p in host.known_hosts_files if p != "/dev/null" and not p.startswith("/etc/")]
        client.set_missing_host_key_policy(_AcceptNewHostKey(writable[0] if writable else None))
    else:  # yes, ask (we cannot ask), or unset
        client.set_missing_host_key_policy(paramiko.RejectPolicy())


def _explain(e: BaseException, host: SSHHost, timed_out: bool) -> str:
    """Why connecting to `host` failed, in words that say what to check."""
    if timed_out or isinstance(e, (socket.timeout, TimeoutError)):
        return f"no answer within ConnectTimeout={host.connect_timeout:g} s (host down or unreachable?)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {host.hostname!r}: {e.strerror}"
    if isinstance(e, paramiko.BadHostKeyException):
        return (
            f"its host key does not match the one in known_hosts ({e.expected_key.get_name()}): "
            "if the host was reinstalled, remove the old key with ssh-keygen -R"
        )
    if isinstance(e, paramiko.AuthenticationException):
        keys = ", ".join(host.identity_files) or "default keys and ssh-agent"
        return f"authentication failed for user {host.user!r} ({type(e).__name__}: {e}; tried {keys})"
    if isinstance(e, paramiko.SSHException) and "known_hosts" in str(e):
        return (
            f"its host key is not in known_hosts ({', '.join(host.known_hosts_files)}): connect once with "
            "`ssh` to accept it, add it with ssh-keyscan, or set StrictHostKeyChecking in the ssh config"
        )
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


class _Connection:
    """An SSH connection to a host and the jump-host connections it runs through."""

    def __init__(self) -> None:
        self.clients: list[paramiko.SSHClient] = []
        self._sockets: list[Any] = []
        self._lock = threading.Lock()
        self.closed = False

    @property
    def transport(self) -> paramiko.Transport:
        return self.clients[-1].get_transport()

    def add_hop(self, host: SSHHost, timeout: float) -> None:
        """Connect to `host`, through the previous hop if there is one."""
        if self.clients:
            sock: Any = (
                self.clients[-1]
                .get_transport()
                .open_channel("direct-tcpip", (host.hostname, host.port), ("127.0.0.1", 0), timeout=timeout)
            )
        elif host.proxy_command:
            sock = paramiko.ProxyCommand(host.proxy_command)
        else:
            sock = socket.create_connection((host.hostname, host.port), timeout)
        self._keep(sock)
        client = paramiko.SSHClient()
        self._keep(client)
        _host_key_policy(client, host)
        keys = [f for f in host.identity_files if os.path.isfile(f)]
        if host.identities_only and not keys:
            raise SSHError(f"IdentitiesOnly is set but no IdentityFile exists ({', '.join(host.identity_files)})")
        client.connect(
            host.hostname,
            host.port,
            host.user,
            sock=sock,
            key_filename=keys or None,
            look_for_keys=not host.identities_only,
            allow_agent=not host.identities_only,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
        self.clients.append(client)

    def _keep(self, closable: Any) -> None:
        with self._lock:
            if self.closed:
                closable.close()
                raise SSHError("connection closed")
            self._sockets.append(closable)

    def close(self) -> None:
        """Close every hop; also unblocks a connect in progress in another thread."""
        with self._lock:
            self.closed = True
            closables, self._sockets = self._sockets, []
        for closable in reversed(closables):
            with contextlib.suppress(Exception):
                closable.close()


class SSHAgentProcess:
    """An agent started over SSH, in its own session on its host."""

    def __init__(
        self, host: SSHHost, connection: _Connection, channel: paramiko.Channel, python: str, mark: str
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
        channel.exec_command(shlex.join(["bash", "-c", _REAPER_SCRIPT, "torchrunx-reaper", self._mark]))
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
    """Starts agents over SSH, as the launcher's ssh config says."""

    def __init__(self, launcher: Launcher | None = None) -> None:
        self.launcher = launcher
        self.config = load_ssh_config(launcher.ssh_config_file if launcher is not None else None)
        self._addresses: dict[str, str] = {}

    def host(self, hostname: str) -> SSHHost:
        """How `hostname` is reached, per the ssh config."""
        return ssh_host(self.config, hostname)

    def launcher_address(self, hostname: str) -> str:
        """This machine's address on the route to `hostname` (or, through jump hosts, to the first one)."""
        if hostname not in self._addresses:
            host = self.host(hostname)
            targets = [host.hostname]
            if host.proxy_jump:
                targets.append(ssh_host(self.config, _parse_jump(host.proxy_jump[0])[0]).hostname)
            errors = []
            for target in targets:
                try:
                    self._addresses[hostname] = route_source_address(target, host.port)
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
        target = self.host(spec.hostname)
        hops = [
            ssh_host(self.config, jump_host, user=user, port=port)
            for jump_host, user, port in map(_parse_jump, target.proxy_jump)
        ]
        hops.append(target)
        budget = sum(h.connect_timeout for h in hops) + 3.0
        connection = _Connection()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            connection.close()

        watchdog = threading.Timer(budget, expire)
        watchdog.daemon = True
        watchdog.start()
        started = time.monotonic()
        try:
            for hop in hops:
                try:
                    connection.add_hop(hop, hop.connect_timeout)
                except SSHError as e:
                    raise SSHError(f"{hop}: {e}") from None
                except Exception as e:
                    raise SSHError(f"{hop}: {_explain(e, hop, expired.is_set())}") from None
            channel = connection.transport.open_session(timeout=target.connect_timeout)
            channel.set_combine_stderr(True)
            mark = secrets.token_hex(8)
            channel.exec_command(_remote_command(spec, mark).encode("utf-8", "surrogateescape"))
            channel.sendall(spec.stdin)
            channel.shutdown_write()
            process = SSHAgentProcess(target, connection, channel, spec.python, mark)
            with contextlib.suppress(paramiko.SSHException):  # e.g. MaxSessions 1: started when needed
                process.start_reaper()
            process.wait_started(max(budget - (time.monotonic() - started), 1.0))
        except SSHError:
            connection.close()
            raise
        except Exception as e:
            connection.close()
            raise SSHError(f"{target}: {_explain(e, target, expired.is_set())}") from None
        finally:
            watchdog.cancel()
        return process


def _remote_command(spec: AgentSpec, mark: str) -> str:
    """The command line for the remote login shell: a new session, then the agent script.

    Variables go through ``env NAME=VALUE`` as single arguments, so their values arrive
    byte-for-byte; nothing is exported by shell text that a value could break out of.
    """
    assignments = [f"{name}={value}" for name, value in spec.env.items() if name and "=" not in name]
    assignments.append(f"{_MARK_VAR}={mark}")
    argv = [
        "setsid", "--wait", "env", "--", *assignments,
        "bash", "-c", _REMOTE_SCRIPT, "torchrunx-agent", spec.cwd, spec.env_file or "", spec.python, *spec.args,
    ]  # fmt: skip
    return "exec " + shlex.join(argv)
