"""The host-discovery interface: where a run's hosts come from when the user names none.

A discovery plugin (``torchrunx.host_discovery`` entry-point group, e.g. ``slurm`` from
trx-remote) is a class built with no arguments. It says itself whether it applies (this
process is inside its kind of allocation), and then which hosts the allocation has and how
many workers each was given. trx-core knows no scheduler by name.
"""

from __future__ import annotations

from typing import Protocol

from . import plugins
from .errors import ConfigurationError

__all__ = ["HostDiscovery", "discover_hosts"]


class HostDiscovery(Protocol):
    """Finds the hosts of the allocation this process runs in."""

    def applies(self) -> bool:
        """True if this process runs inside an allocation this plugin knows."""
        ...

    def hostnames(self) -> list[str]:
        """The allocation's hosts, in order; raise `ConfigurationError` if there are none."""
        ...

    def workers_per_host(self) -> list[int] | None:
        """Workers per host as the allocation says (tasks or GPUs per node), or None if it says neither."""
        ...


def discover_hosts(setting: str) -> tuple[list[str], list[int] | None]:
    """The hosts for ``hostnames="auto"`` or ``"slurm"``, and the allocation's worker counts.

    ``"auto"``: the first installed discovery that applies, else this machine alone.
    Any other name: that discovery plugin, which must exist.
    """
    if setting == "auto":
        for make in plugins.find_all(plugins.HOST_DISCOVERY):
            discovery: HostDiscovery = make()
            if discovery.applies():
                return discovery.hostnames(), discovery.workers_per_host()
        return ["localhost"], None
    make = plugins.find(plugins.HOST_DISCOVERY, setting)
    if make is None:
        raise ConfigurationError(
            f"hostnames={setting!r} needs the {setting!r} host discovery, which is not installed "
            "(trx-remote provides 'slurm': pip install torchrunx)"
        )
    discovery = make()
    return discovery.hostnames(), discovery.workers_per_host()
