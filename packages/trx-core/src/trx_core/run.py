"""One launch, from a validated `Launcher` to a `LaunchResult` (or an exception).

The steps, each a plain function or object: pickle the payload; plan the hosts
(`trx_core.plan`); build the executor and the log pipeline from the few settings they use;
then a `Supervisor` starts the agents and follows the run to its end. A warm session
(`trx_core.session`) builds its supervisor with the same functions and keeps it.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _pickling, plan
from ._debug_console import post_mortem_env
from .errors import ConfigurationError
from .executor import ExecutorSettings, resolve_executor
from .logs import LogPipeline, LogSettings, resolve_log_pipeline
from .results import LaunchResult
from .supervisor import RunSettings, Supervisor

if TYPE_CHECKING:
    from .launcher import Launcher

__all__ = ["execute", "new_pipeline", "new_supervisor", "pickle_payload", "worker_settings"]


def execute(
    launcher: Launcher, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> LaunchResult:
    """Run `func` as `launcher` says, on agents started for this run alone. `launcher` must have been validated."""
    payload = pickle_payload(func, args, kwargs)
    with new_supervisor(launcher) as supervisor:
        pipeline = new_pipeline(launcher)  # after every check of the settings: it may create the log folder
        supervisor.start()
        return supervisor.run(payload, pipeline)


def new_supervisor(launcher: Launcher, keep_agents: bool = False) -> Supervisor:
    """A supervisor for `launcher`'s hosts, its agents not started yet."""
    hosts = plan.plan_hosts(launcher.hostnames, launcher.workers_per_host)
    executor = resolve_executor(launcher.executor, ExecutorSettings(ssh_config_file=launcher.ssh_config_file))
    addresses = [launcher.launcher_address or executor.launcher_address(h) for h in hosts.hostnames]
    env_file = str(launcher.env_file) if launcher.env_file is not None else None
    if (
        env_file is not None
        and all(plan.is_loopback(a) for a in addresses)
        and not Path(env_file).expanduser().is_file()
    ):
        # Every host is this machine: the file can be checked here, before anything starts.
        raise ConfigurationError(f"env_file {env_file!r} does not exist or is not a file")
    worker = worker_settings(launcher)
    settings = RunSettings(
        backend=launcher.backend,
        workers_per_host=hosts.workers_per_host,
        timeout=launcher.timeout,
        hang_timeout=launcher.hang_timeout,
        heartbeat_timeout=launcher.heartbeat_timeout,
        env=plan.agent_env({**launcher.matched_env(), **post_mortem_env(launcher.post_mortem)}, worker.run_id),
        env_file=env_file,
        python=sys.executable,
        cwd=os.getcwd(),
        signal_grace=launcher.signal_grace,
        worker=worker,
    )
    return Supervisor(settings, hosts.hostnames, addresses, executor, keep_agents=keep_agents)


def worker_settings(launcher: Launcher, started_env: Mapping[str, str] | None = None) -> plan.WorkerSettings:
    """What every worker of a new run shares: a fresh run id, and the launcher's ``sys.path``,
    ``sys.argv`` and script as they are now. `started_env`: the environment the agents were
    started with (in a session), whose changes since then the workers get."""
    env: dict[str, str] = {}
    unset: tuple[str, ...] = ()
    if started_env is not None:
        env, unset = plan.environment_changes(started_env, launcher.matched_env())
    return plan.WorkerSettings(
        run_id=f"{datetime.now():%Y%m%d%H%M%S}-{secrets.token_hex(4)}",
        backend=launcher.backend,
        timeout=launcher.timeout,
        hang_timeout=launcher.hang_timeout,
        sys_path=tuple(sys.path),
        argv=tuple(sys.argv),
        main_path=plan.launcher_script(),
        env=env,
        unset=unset,
    )


def new_pipeline(launcher: Launcher) -> LogPipeline:
    """The log pipeline of one run."""
    return resolve_log_pipeline(LogSettings(launcher.logs, launcher.log_console, launcher.log_format))


def pickle_payload(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[memoryview]:
    """The function and its arguments, as the workers get them."""
    if not callable(func):
        raise ConfigurationError(f"func must be callable, got {type(func).__qualname__}")
    try:
        return _pickling.dumps((func, args, kwargs))
    except Exception as e:
        raise ConfigurationError(
            f"cannot send {getattr(func, '__qualname__', func)!r} and its arguments to the workers, "
            f"they must be picklable (by cloudpickle): {type(e).__name__}: {e}"
        ) from e
