"""A launch as data: pure functions from the settings (and what agents report) to a plan.

Two steps, since worker counts may depend on the hosts themselves (``"gpu"``, ``"cpu"``,
``"auto"``):

1. `plan_hosts`: before any process starts, which hosts and what each agent is started with;
2. `plan_workers`: once every agent said hello (with its GPU and CPU counts), how many workers
   each host gets, which global ranks they are, and each worker's `WorkerSpec`.

Nothing here starts a process or opens a socket, so every rule is testable as a function.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .discovery import discover_hosts
from .errors import ConfigurationError
from .protocol import WorkerSpec

__all__ = [
    "HostReport",
    "HostsPlan",
    "WorkerSettings",
    "agent_args",
    "agent_env",
    "check_backend",
    "is_loopback",
    "launcher_script",
    "placement",
    "plan_hosts",
    "plan_workers",
    "rendezvous_addresses",
    "store_bind_address",
    "worker_counts",
]

WorkersPerHost = int | Sequence[int] | str


@dataclass(frozen=True)
class HostReport:
    """What an agent reports about its host."""

    hostname: str
    gpus: int
    cpus: int


@dataclass(frozen=True)
class HostsPlan:
    """The hosts of a run, and the ``workers_per_host`` setting that applies to them.

    ``workers_per_host`` is the user's setting, except that ``"auto"`` becomes the
    allocation's counts when the hosts themselves came from an allocation that says them.
    """

    hostnames: tuple[str, ...]
    workers_per_host: WorkersPerHost


def plan_hosts(hostnames: Sequence[str] | str, workers_per_host: WorkersPerHost) -> HostsPlan:
    """The hosts: the given list, or discovered for ``"auto"`` / a discovery name such as ``"slurm"``."""
    if not isinstance(hostnames, str):
        return HostsPlan(tuple(hostnames), workers_per_host)
    found, counts = discover_hosts(hostnames)
    if workers_per_host == "auto" and counts is not None and len(counts) == len(found):
        return HostsPlan(tuple(found), tuple(counts))
    return HostsPlan(tuple(found), workers_per_host)


def worker_counts(setting: WorkersPerHost, reports: Sequence[HostReport]) -> list[int]:
    """Workers per host: a number for all, one per host, ``"gpu"``, ``"cpu"`` or ``"auto"``
    (one per GPU where there are GPUs, else 1)."""
    if isinstance(setting, int):
        return [setting] * len(reports)
    if not isinstance(setting, str):
        return [int(n) for n in setting]
    counts = []
    for report in reports:
        if setting == "gpu":
            if report.gpus == 0:
                raise ConfigurationError(f"workers_per_host='gpu' but host {report.hostname!r} has no GPU")
            counts.append(report.gpus)
        elif setting == "cpu":
            counts.append(report.cpus)
        else:
            counts.append(report.gpus or 1)
    return counts


def check_backend(backend: str | None, hostnames: Sequence[str], reports: Sequence[HostReport]) -> None:
    """nccl needs a GPU on every host: refuse it, before any worker starts, where there is none."""
    if backend != "nccl":
        return
    for hostname, report in zip(hostnames, reports, strict=True):
        if report.gpus == 0:
            raise ConfigurationError(
                f"backend='nccl' needs CUDA GPUs, but host {hostname!r} has none: use backend='gloo' "
                "(or 'auto', which picks nccl where there are GPUs and gloo where there are none)"
            )


@dataclass(frozen=True)
class WorkerSettings:
    """The settings every worker of a run shares."""

    run_id: str
    backend: str | None
    timeout: int
    hang_timeout: float | None = None
    sys_path: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()
    main_path: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables every worker gets besides those of its agent (a warm session's changes since its start)."""
    unset: tuple[str, ...] = ()
    """Variables removed from every worker's environment."""


def environment_changes(started: Mapping[str, str], now: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """What changed in the copied environment since the agents started: (set or changed, removed)."""
    changed = {k: v for k, v in now.items() if started.get(k) != v}
    return changed, tuple(sorted(k for k in started if k not in now))


def plan_workers(
    counts: Sequence[int],
    rendezvous: Sequence[tuple[str, int]],
    settings: WorkerSettings,
) -> tuple[tuple[WorkerSpec, ...], ...]:
    """Each host's worker specs (hosts in order, given by their worker `counts`), ranks
    numbered host by host. `rendezvous` is, per host, the store's address and port as that host reaches them.
    """
    world_size = sum(counts)
    plan: list[tuple[WorkerSpec, ...]] = []
    rank = 0
    for node_rank, (count, (address, port)) in enumerate(zip(counts, rendezvous, strict=True)):
        specs = []
        for local_rank in range(count):
            env = {
                **settings.env,
                "TORCHRUNX_RUN_ID": settings.run_id,
                "RANK": str(rank),
                "LOCAL_RANK": str(local_rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(count),
                "NODE_RANK": str(node_rank),
                "GROUP_RANK": str(node_rank),
                "ROLE_RANK": str(rank),
                "ROLE_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": address,
                "MASTER_PORT": str(port),
                # As under torchrun: libraries (Lightning...) recognise an elastic launch by these,
                # and an env:// rendezvous connects to our store instead of hosting its own.
                "TORCHELASTIC_RUN_ID": settings.run_id,
                "TORCHELASTIC_USE_AGENT_STORE": "True",
                "TORCHELASTIC_RESTART_COUNT": "0",
                "TORCHELASTIC_MAX_RESTARTS": "0",
            }
            specs.append(
                WorkerSpec(
                    rank,
                    local_rank,
                    env,
                    settings.backend,
                    settings.timeout,
                    settings.sys_path,
                    settings.hang_timeout,
                    settings.argv,
                    settings.main_path,
                    settings.unset,
                )
            )
            rank += 1
        plan.append(tuple(specs))
    return tuple(plan)


def placement(hostnames: Sequence[str], counts: Sequence[int]) -> list[tuple[str, int]]:
    """Global rank -> (hostname, local rank), ranks numbered host by host."""
    return [(host, local_rank) for host, count in zip(hostnames, counts, strict=True) for local_rank in range(count)]


def rendezvous_addresses(
    launcher_addresses: Sequence[str], host0_address: str, host0_is_local: bool, port: int
) -> list[tuple[str, int]]:
    """Where each host's workers reach the store that agent 0 hosts.

    If host 0 is the launcher's own machine, each host reaches it at the address it reaches
    the launcher at; otherwise at host 0's own address.
    """
    if host0_is_local:
        return [(address, port) for address in launcher_addresses]
    return [(host0_address, port) for _ in launcher_addresses]


def store_bind_address(launcher_addresses: Sequence[str]) -> str:
    """Where agent 0 binds the store: loopback for a run on this machine alone; all
    interfaces when host 0 is this machine and other hosts reach it on addresses of their own;
    else host 0's address facing the launcher (``route``)."""
    if all(is_loopback(a) for a in launcher_addresses):
        return "127.0.0.1"
    return "0.0.0.0" if is_loopback(launcher_addresses[0]) else "route"


def agent_args(
    launcher_host: str,
    port: int,
    index: int,
    heartbeat_timeout: float,
    store: str | None,
    launcher_process: str | None = None,
) -> tuple[str, ...]:
    """The arguments of ``python -m trx_core.agent`` for host `index`. `launcher_process`
    (``PID:START_TIME``) lets an agent whose parent is the launcher stop the moment it exits."""
    host = f"[{launcher_host}]" if ":" in launcher_host else launcher_host
    args = ["-m", "trx_core.agent", "--launcher", f"{host}:{port}", "--host-index", str(index)]
    args += ["--heartbeat-timeout", str(heartbeat_timeout)]
    if launcher_process is not None:
        args += ["--launcher-process", launcher_process]
    if store is not None:
        args += ["--store-host", store]
    return tuple(args)


def agent_env(matched: Mapping[str, str], run_id: str) -> dict[str, str]:
    """The environment every agent (and so every worker) gets on top of its host's own."""
    return {**matched, "TORCHRUNX_RUN_ID": run_id}


def launcher_script() -> str | None:
    """The launcher's ``__main__`` script, as an absolute path (None in a notebook or REPL)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return os.path.abspath(path) if isinstance(path, str) and os.path.exists(path) else None


def is_loopback(address: str) -> bool:
    """A loopback name or address."""
    return address in ("localhost", "::1") or address.startswith("127.")
