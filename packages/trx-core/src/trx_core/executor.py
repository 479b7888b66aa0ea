"""The node-executor interface: how an agent gets started on a host, and stopped.

trx-core never starts agents itself. An executor does, given an `AgentSpec` (what to run,
where, with which environment). Executors are plugins (`trx_core.plugins`): registered in
this process with `register_executor`, or installed in the ``torchrunx.executors``
entry-point group. Either way the object is a factory, called with the `ExecutorSettings`
of the launch and returning a `NodeExecutor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from . import plugins
from .errors import ConfigurationError

__all__ = [
    "AgentProcess",
    "AgentSpec",
    "ExecutorFactory",
    "ExecutorSettings",
    "NodeExecutor",
    "available_executors",
    "register_executor",
    "resolve_executor",
]


@dataclass(frozen=True)
class ExecutorSettings:
    """The launcher settings an executor may use."""

    ssh_config_file: Path | None = None
    """OpenSSH-format config for reaching hosts (None: ``~/.ssh/config``)."""


@dataclass(frozen=True)
class AgentSpec:
    """Everything an executor needs to start one agent.

    The executor must run ``python *args`` in ``cwd`` on ``hostname`` with every variable of
    ``env`` set byte-for-byte in its environment, after sourcing ``env_file`` with bash when
    it is given, and write ``stdin`` to the agent's standard input. ``stdin`` carries the
    run's secret, and neither it nor any value of ``env`` may be put on a command line.
    """

    hostname: str
    python: str
    args: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    env_file: str | None
    stdin: bytes


@runtime_checkable
class AgentProcess(Protocol):
    """A started agent, as its executor sees it."""

    def fileno(self) -> int:
        """A file descriptor that becomes readable once the agent has ended."""
        ...

    def poll(self) -> str | None:
        """None while the agent runs; otherwise how it ended, for an error message."""
        ...

    def stop(self) -> None:
        """Kill the agent and everything it started. Idempotent; returns within seconds."""
        ...


class NodeExecutor(Protocol):
    """Starts agents on hosts."""

    def launcher_address(self, hostname: str) -> str:
        """The address at which agents and workers on `hostname` reach this machine (a loopback
        address exactly when `hostname` is this machine)."""
        ...

    def start(self, spec: AgentSpec) -> AgentProcess:
        """Start one agent. May block while connecting; raise with a clear message on failure."""
        ...


ExecutorFactory = Callable[[ExecutorSettings], NodeExecutor]


def register_executor(name: str, factory: ExecutorFactory) -> None:
    """Make `factory` selectable as ``Launcher(executor=name)`` in this process."""
    plugins.register(plugins.EXECUTORS, name, factory)


def available_executors() -> list[str]:
    """Names of all executors registered or installed as entry points."""
    return plugins.names(plugins.EXECUTORS)


def resolve_executor(name: str, settings: ExecutorSettings) -> NodeExecutor:
    """Build the executor called `name`."""
    factory: ExecutorFactory | None = plugins.find(plugins.EXECUTORS, name)
    if factory is None:
        known = ", ".join(available_executors()) or "none installed"
        raise ConfigurationError(
            f"unknown executor {name!r} (available: {known}). Install `torchrunx` for the "
            "local and SSH executors, or register your own with "
            "trx_core.register_executor() or the 'torchrunx.executors' entry-point group."
        )
    return factory(settings)
