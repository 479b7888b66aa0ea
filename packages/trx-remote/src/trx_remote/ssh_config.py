"""Reading an OpenSSH-format config: how each host is reached.

Options honoured: HostName, Port, User, IdentityFile, IdentitiesOnly, ProxyJump (several
hops), ProxyCommand, ConnectTimeout, StrictHostKeyChecking, UserKnownHostsFile,
GlobalKnownHostsFile; OpenSSH's defaults otherwise.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

import paramiko

from trx_core import ConfigurationError

__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "SSHHost", "load_ssh_config", "route", "ssh_host"]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
"""Used when the config sets no ConnectTimeout (OpenSSH would wait for the kernel's TCP timeout)."""


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


def route(config: paramiko.SSHConfig, alias: str) -> list[SSHHost]:
    """The hosts to connect to, in order, to reach `alias`: its ProxyJump hops, then itself."""
    target = ssh_host(config, alias)
    hops = [ssh_host(config, host, user=user, port=port) for host, user, port in map(_parse_jump, target.proxy_jump)]
    return [*hops, target]


def _parse_jump(entry: str) -> tuple[str, str | None, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` -> (host, user, port)."""
    entry = entry.removeprefix("ssh://")
    user, _, hostport = entry.rpartition("@")
    host, port = hostport, None
    try:
        if hostport.startswith("["):  # [v6addr]:port
            host, _, rest = hostport[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else None
        elif hostport.count(":") == 1:
            host, port_text = hostport.split(":")
            port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"ssh config: ProxyJump entry {entry!r} has an invalid port") from None
    return host, user or None, port
