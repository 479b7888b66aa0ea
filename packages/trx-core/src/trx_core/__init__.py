"""trx-core: the torchrunx launcher core.

Holds the `Launcher` dataclass, the launch protocol, the agent and worker runtime, and the
interfaces other packages implement: node executors (`NodeExecutor`) and log pipelines
(`LogPipeline`). It depends on torch and cloudpickle only; importing it does not import torch.
"""

from ._debug_console import print_stacks
from .discovery import HostDiscovery
from .errors import (
    AgentFailedError,
    ConfigurationError,
    ResultUnpicklingError,
    RunInterrupted,
    WorkerError,
    WorkerExitError,
    WorkerFailedError,
    WorkerHungError,
    WorkerInterruptedError,
)
from .executor import AgentProcess, AgentSpec, ExecutorSettings, NodeExecutor, available_executors, register_executor
from .launcher import DEFAULT_ENV_VARS, Launcher, launch
from .logs import ConsolePipeline, LogPipeline, LogRecord, LogSettings, RunInfo, log_level_from_env
from .results import LaunchResult

__all__ = [
    "DEFAULT_ENV_VARS",
    "AgentFailedError",
    "AgentProcess",
    "AgentSpec",
    "ConfigurationError",
    "ConsolePipeline",
    "ExecutorSettings",
    "HostDiscovery",
    "LaunchResult",
    "Launcher",
    "LogPipeline",
    "LogRecord",
    "LogSettings",
    "NodeExecutor",
    "ResultUnpicklingError",
    "RunInfo",
    "RunInterrupted",
    "WorkerError",
    "WorkerExitError",
    "WorkerFailedError",
    "WorkerHungError",
    "WorkerInterruptedError",
    "available_executors",
    "launch",
    "log_level_from_env",
    "print_stacks",
    "register_executor",
]
