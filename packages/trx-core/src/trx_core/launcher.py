"""The user-facing entry points: the `Launcher` dataclass and `launch()`."""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from ._checks import (
    call_arguments,
    check_environment_size,
    check_log_file_names,
    check_numpy_torch_versions,
    validate_workers_per_host,
)
from ._debug_console import check_post_mortem
from .errors import ConfigurationError
from .results import LaunchResult

if TYPE_CHECKING:
    from .session import Session

__all__ = ["DEFAULT_ENV_VARS", "Launcher", "check_numpy_torch_versions", "launch"]

DEFAULT_ENV_VARS: tuple[str, ...] = (
    "PATH",
    "LD_LIBRARY_PATH",
    "LIBRARY_PATH",
    "LD_PRELOAD",
    "PYTHON*",
    "VIRTUAL_ENV",
    "CONDA_*",
    "CUDA*",
    "TORCH*",
    "PYTORCH*",
    "NCCL*",
    "GLOO_*",
    "UCC_*",
    "UCX_*",
    "OMP_*",
    "MKL_*",
    "HF_*",
    "TRANSFORMERS_*",
    "ACCELERATE_*",
    "WANDB_*",
)
"""Environment variables copied from the launcher to agents and workers by default
(fnmatch patterns): what Python, PyTorch, CUDA, NCCL and the usual ML libraries read."""

Backend = Literal["nccl", "gloo", "mpi", "ucc", "auto"]
_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "auto")


def _default_logs() -> Path | None:
    folder = os.environ.get("TORCHRUNX_LOG_DIR", "torchrunx_logs")
    return Path(folder) if folder else None  # set but empty: no files, as upstream torchrunx


@dataclass
class Launcher:
    """Runs a function on every worker of one or many hosts.

    Every field is a plain type, so tyro.cli(Launcher) builds one from the command line, with
    these descriptions as the help of its flags.
    """

    # Field docs are plain text: tyro prints them as they are in --help.
    hostnames: list[str] | Literal["auto", "slurm"] = "auto"
    """Hosts to run on. "auto": the SLURM allocation if inside one, else this machine."""

    workers_per_host: int | list[int] | Literal["auto", "gpu", "cpu"] = "auto"
    """Workers per host: one number for all hosts, or one per host; "gpu": one per GPU; "cpu": one
    per CPU core; "auto": one per GPU if the host has any, else 1."""

    ssh_config_file: Path | None = None
    """OpenSSH-format config used to reach hosts (None: ~/.ssh/config)."""

    launcher_address: str | None = None
    """The address at which agents and workers reach this machine (None: for each host, this
    machine's address on the route to it). Set it when routes mislead, e.g. behind NAT."""

    backend: Backend | None = "auto"
    """Backend of the workers' process group. "auto": nccl with CUDA, else gloo; None: no group."""

    logs: Path | None = field(default_factory=_default_logs)
    """Folder for the run's log files (default: $TORCHRUNX_LOG_DIR, else ./torchrunx_logs); None,
    or TORCHRUNX_LOG_DIR set but empty: write no files."""

    log_console: Literal["stdout", "stderr"] | None = "stdout"
    """Where the launcher shows agent 0's log (its messages and rank 0's output) as it happens;
    None: nowhere."""

    log_format: Literal["text", "jsonl"] = "text"
    """How log files render each record: "text" (.log files, for people) or "jsonl" (.jsonl
    files, one JSON object per line, for machines)."""

    env_vars: tuple[str, ...] = DEFAULT_ENV_VARS
    """Launcher environment variables copied to agents and workers (fnmatch patterns)."""

    extra_env_vars: dict[str, str] | None = None
    """Variables set on every agent and worker with these values, besides those env_vars copies."""

    env_file: Path | None = None
    """A file that bash sources on every host before the agent starts."""

    timeout: int = 600
    """Timeout in seconds of the workers' process group, and for agents to start."""

    hang_timeout: float | None = None
    """Seconds a worker may go without progress (its main thread staying at the same spot, e.g.
    blocked in a collective whose peer hangs) before the run is stopped with WorkerHungError,
    every worker's stack written to its log. None: never."""

    heartbeat_timeout: float = 15.0
    """Seconds without a word from an agent (a host) before it is declared lost; an agent that
    hears nothing from the launcher for as long stops its workers. Heartbeats go every second."""

    executor: str = "auto"
    """How agents are started: "auto" (inside a SLURM job: job steps on the job's nodes; local for
    this machine, SSH otherwise), "local", "ssh", "slurm" (job steps), or the name of an installed
    executor plugin."""

    signal_grace: float = 30.0
    """Seconds the workers get to end after the launcher sent on to them a SIGTERM, SIGUSR1 or
    SIGUSR2 it received (e.g. a SLURM preemption warning: time to save a checkpoint); then the
    run is stopped. Either way the launcher raises RunInterrupted. Only when run is called from
    the main thread."""

    post_mortem: bool = False
    """Stop a worker whose function raises in pdb, in this program's terminal, at the line that
    raised, before its exception is sent back (see the Debugging page). Needs a terminal: refused
    when standard input is not one (a batch job, a notebook, a pipe)."""

    # -- warm sessions ----------------------------------------------------------------
    def start(self) -> Launcher:
        """Start a warm session: one agent per host, started now and kept until `close()`, so
        that every `run()` in between forks fresh workers at once instead of starting agents.

        Returns the launcher. Blocks until every agent is ready; raises (having stopped them)
        if one cannot be started. Prefer ``with Launcher(...) as launcher:``, which closes the
        session however the block ends. See the "Warm sessions" page of the docs.
        """
        from .session import Session  # the runtime, kept out of `import trx_core`'s path

        if _session_of(self) is not None:
            raise ConfigurationError("this launcher's session is already started: close() it first")
        self.validate()
        session = Session(self)
        session.start()
        self.__dict__[_SESSION] = session
        return self

    def close(self) -> None:
        """Stop the session's agents (on every host). Does nothing without an open session."""
        session = self.__dict__.pop(_SESSION, None)
        if session is not None:
            session.close()

    def __enter__(self) -> Launcher:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def run(
        self,
        func: Callable[..., Any],
        func_kwargs: Mapping[str, Any] | None = None,
        *,
        func_args: Sequence[Any] | None = None,
        **unexpected: Any,
    ) -> LaunchResult:
        """Run ``func(*func_args, **func_kwargs)`` on every worker; return their results by rank.

        An exception raised by a worker is re-raised here with its own type and the
        worker's traceback attached. A worker that dies without raising raises
        `WorkerFailedError`; an agent that dies raises `AgentFailedError`. Every process of
        the run is stopped before this returns or raises (in a warm session, see `start()`,
        the agents stay for the next run).
        """
        from .run import execute  # the runtime, kept out of `import trx_core`'s path

        args, kwargs = call_arguments(func_kwargs, func_args, unexpected)
        session = _session_of(self)
        if session is not None:
            return session.run(func, args, kwargs)
        self.validate()
        return execute(self, func, args, kwargs)

    def validate(self) -> None:
        """Raise `ConfigurationError` for settings that cannot work, saying what to change."""
        if isinstance(self.hostnames, str):
            if self.hostnames not in ("auto", "slurm"):
                raise ConfigurationError(
                    f"hostnames={self.hostnames!r} is not valid: pass a list of hostnames, "
                    "'auto' or 'slurm' (for a single host write hostnames=[...])"
                )
        else:
            if len(self.hostnames) == 0:
                raise ConfigurationError("hostnames is empty: pass at least one host, e.g. ['localhost']")
            if not all(isinstance(h, str) and h.strip() for h in self.hostnames):
                raise ConfigurationError(f"hostnames must be non-empty strings, got {self.hostnames!r}")
            duplicates = sorted({h for h in self.hostnames if list(self.hostnames).count(h) > 1})
            if duplicates:
                raise ConfigurationError(
                    f"hostnames lists {duplicates} more than once; list each host once and "
                    "set workers_per_host for more workers on it"
                )
        validate_workers_per_host(self.workers_per_host, self.hostnames)
        if self.backend not in (*_BACKENDS, None):
            raise ConfigurationError(f"unknown backend {self.backend!r}: use one of {', '.join(_BACKENDS)} or None")
        if not isinstance(self.timeout, int) or isinstance(self.timeout, bool) or self.timeout <= 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.hang_timeout is not None and not (
            isinstance(self.hang_timeout, (int, float)) and self.hang_timeout > 0
        ):
            raise ConfigurationError(
                f"hang_timeout must be a positive number of seconds or None, got {self.hang_timeout!r}"
            )
        if not isinstance(self.heartbeat_timeout, (int, float)) or not self.heartbeat_timeout >= 3:
            raise ConfigurationError(
                f"heartbeat_timeout must be at least 3 seconds (heartbeats go every second), "
                f"got {self.heartbeat_timeout!r}"
            )
        if (
            not isinstance(self.signal_grace, (int, float))
            or isinstance(self.signal_grace, bool)
            or not 0 <= self.signal_grace < float("inf")
        ):
            raise ConfigurationError(f"signal_grace must be a number of seconds, 0 or more, got {self.signal_grace!r}")
        if self.extra_env_vars is not None and not (
            isinstance(self.extra_env_vars, Mapping)
            and all(
                isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in self.extra_env_vars.items()
            )
        ):
            raise ConfigurationError(
                f"extra_env_vars must map variable names to string values, got {self.extra_env_vars!r}"
            )
        if isinstance(self.env_vars, str):
            raise ConfigurationError(f"env_vars must be a tuple of patterns, not the string {self.env_vars!r}")
        if not isinstance(self.post_mortem, bool):
            raise ConfigurationError(f"post_mortem must be True or False, got {self.post_mortem!r}")
        check_post_mortem(self.post_mortem)
        check_numpy_torch_versions()
        check_environment_size(self.matched_env())
        if self.logs is not None:
            check_log_file_names(self.hostnames, self.workers_per_host)
        for pattern in self.env_vars:
            if pattern not in DEFAULT_ENV_VARS and not any(fnmatch.fnmatchcase(k, pattern) for k in os.environ):
                warnings.warn(
                    f"env_vars pattern {pattern!r} matches no variable of the launcher's environment: "
                    "nothing is copied for it (names are case-sensitive)",
                    stacklevel=3,
                )

    def matched_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The variables every agent and worker gets: the launcher's that `env_vars` selects,
        then `extra_env_vars`."""
        environ = os.environ if environ is None else environ
        matched = {k: v for k, v in environ.items() if any(fnmatch.fnmatchcase(k, p) for p in self.env_vars)}
        return {**matched, **(self.extra_env_vars or {})}


# A launcher's open session lives in its __dict__, not in a field: it is state, not configuration
# (dataclass fields are what tyro, equality and repr see).
_SESSION = "_torchrunx_session"


def _session_of(launcher: Launcher) -> Session | None:
    session: Session | None = launcher.__dict__.get(_SESSION)
    return session if session is not None and not session.closed else None


def launch(
    func: Callable[..., Any],
    func_kwargs: Mapping[str, Any] | None = None,
    *,
    func_args: Sequence[Any] | None = None,
    **launcher_fields: Any,
) -> LaunchResult:
    """Run `func` on every worker: ``Launcher(**launcher_fields).run(func, func_kwargs, func_args=...)``."""
    for name in ("func_args", "func_kwargs"):
        if name in launcher_fields:  # only reachable by an odd call, but say it plainly
            raise ConfigurationError(f"{name} given twice")
    args, kwargs = call_arguments(func_kwargs, func_args, {})
    try:
        launcher = Launcher(**launcher_fields)
    except TypeError as e:
        raise ConfigurationError(f"{e}; valid fields are those of torchrunx.Launcher") from None
    return launcher.run(func, kwargs, func_args=args)
