"""The node-executor interface: how an agent gets started on a host, and stopped.

trx-core never starts agents itself. An executor does, given an `AgentSpec` (what to run,
where, with which environment). Executors are found by name: first among those registered
with `register_executor`, then in the `torchrunx.executors` entry-point group, whose
objects are factories called with the `Launcher` and returning a `NodeExecutor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .launcher import Launcher

__all__ = [
    "AgentProcess",
    "AgentSpec",
    "ExecutorFactory",
    "NodeExecutor",
    "available_executors",
    "register_executor",
    "resolve_executor",
]

ENTRY_POINT_GROUP = "torchrunx.executors"


@dataclass(frozen=True)
class AgentSpec:
    """Everything an executor needs to start one agent.

    The executor must run ``python *args`` in ``cwd`` on ``hostname`` with every variable of
    ``env`` set byte-for-byte in its environment, after sourcing ``env_file`` with bash when
    it is given, and write ``stdin`` to the agent's standard input. ``stdin`` carries the
    run's secret: it must never be put on a command line.
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
        """The address at which agents and workers on `hostname` reach this machine."""
        ...

    def start(self, spec: AgentSpec) -> AgentProcess:
        """Start one agent. May block while connecting; raise with a clear message on failure."""
        ...


ExecutorFactory = Callable[["Launcher"], NodeExecutor]
_registry: dict[str, ExecutorFactory] = {}


def register_executor(name: str, factory: ExecutorFactory) -> None:
    """Make `factory` selectable as ``Launcher(executor=name)`` in this process."""
    _registry[name] = factory


def available_executors() -> list[str]:
    """Names of all executors registered or installed as entry points."""
    return sorted(set(_registry) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def resolve_executor(name: str, launcher: Launcher) -> NodeExecutor:
    """Build the executor called `name` for `launcher`."""
    factory = _registry.get(name)
    if factory is None:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            known = ", ".join(available_executors()) or "none installed"
            raise ConfigurationError(
                f"unknown executor {name!r} (available: {known}). Install `torchrunx` for the "
                "local and SSH executors, or register your own with "
                "trx_core.register_executor() or the 'torchrunx.executors' entry-point group."
            )
        factory = matches[0].load()
    return factory(launcher)
