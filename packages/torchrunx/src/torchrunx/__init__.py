"""torchrunx: call a function on every GPU or CPU worker of one or many machines.

    import torchrunx as trx
    results = trx.launch(train, {"lr": 1e-3}, hostnames=["node1", "node2"], workers_per_host=8)

This package only composes trx-core (the launcher and runtime), trx-remote (local and SSH
executors) and trx-logging (the log layout), and re-exports the public API.
"""

from importlib.metadata import version as _version

from trx_core import (
    DEFAULT_ENV_VARS,
    AgentFailedError,
    ConfigurationError,
    Launcher,
    LaunchResult,
    LogRecord,
    ResultUnpicklingError,
    RunInterrupted,
    WorkerError,
    WorkerExitError,
    WorkerFailedError,
    WorkerHungError,
    WorkerInterruptedError,
    launch,
    print_stacks,
)
from trx_logging import add_sink

__version__ = _version("torchrunx")
"""The installed version of torchrunx."""

__all__ = [
    "DEFAULT_ENV_VARS",
    "AgentFailedError",
    "ConfigurationError",
    "LaunchResult",
    "Launcher",
    "LogRecord",
    "ResultUnpicklingError",
    "RunInterrupted",
    "WorkerError",
    "WorkerExitError",
    "WorkerFailedError",
    "WorkerHungError",
    "WorkerInterruptedError",
    "add_sink",
    "launch",
    "print_stacks",
]
