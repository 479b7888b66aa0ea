"""An SSH connection to a host, through its jump hosts, with paramiko.

Host keys are checked against the known_hosts files unless the config says
``StrictHostKeyChecking no`` (or ``accept-new``, which also records new keys). A failure to
connect becomes an `SSHError` whose message says what to check.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paramiko

from .ssh_config import SSHHost

__all__ = ["SSHConnection", "SSHError", "explain"]


class SSHError(ConnectionError):
    """A host could not be reached, or refused us; the message names the host and the cause."""


class SSHConnection:
    """An SSH connection to a host and the jump-host connections it runs through.

    `close` may be called from any thread, also while `connect` is in progress, which it
    then interrupts.
    """

    def __init__(self) -> None:
        self.clients: list[paramiko.SSHClient] = []
        self.expired = False
        """Set when a `deadline` closed the connection."""
        self._closables: list[Any] = []
        self._lock = threading.Lock()
        self.closed = False

    @property
    def transport(self) -> paramiko.Transport:
        """The transport to the last host connected."""
        return self.clients[-1].get_transport()

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Close the connection if the block is still running after `seconds` (`expired` says so)."""

        def expire() -> None:
            self.expired = True
            self.close()

        watchdog = threading.Timer(seconds, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            yield
        finally:
            watchdog.cancel()

    def connect(self, hops: Sequence[SSHHost]) -> None:
        """Connect to each host of `hops` in turn, each through the previous one."""
        for hop in hops:
            try:
                self._add_hop(hop)
            except SSHError as e:
                raise SSHError(f"{hop}: {e}") from None
            except Exception as e:
                raise SSHError(f"{hop}: {explain(e, hop, self.expired)}") from None

    def _add_hop(self, host: SSHHost) -> None:
        timeout = host.connect_timeout
        if self.clients:
            sock: Any = self.transport.open_channel(
                "direct-tcpip", (host.hostname, host.port), ("127.0.0.1", 0), timeout=timeout
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
            self._closables.append(closable)

    def close(self) -> None:
        """Close every hop; also unblocks a connect in progress in another thread."""
        with self._lock:
            self.closed = True
            closables, self._closables = self._closables, []
        for closable in reversed(closables):
            with contextlib.suppress(Exception):
                closable.close()


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


def explain(e: BaseException, host: SSHHost, timed_out: bool) -> str:
    """Why connecting to `host` (or starting a command there) failed, in words that say what to check."""
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
