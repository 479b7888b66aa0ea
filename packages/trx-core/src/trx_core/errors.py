"""Exceptions that a launch raises in the launcher process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .results import LaunchResult

__all__ = [
    "AgentFailedError",
    "ConfigurationError",
    "WorkerHungError",
    "WorkerError",
    "WorkerFailedError",
    "Failure",
    "RunInterrupted",
    "attach_remote_traceback",
    "combine_failures",
    "WorkerExitError",
    "WorkerInterruptedError",
    "ResultUnpicklingError",
    "worker_exception",
]


class ConfigurationError(ValueError):
    """A `Launcher` setting or a launch argument is wrong; raised before any process starts."""


class WorkerFailedError(RuntimeError):
    """A worker process died without raising an exception (signal, `os._exit`, OOM kill...)."""

    def __init__(self, hostname: str, local_rank: int, rank: int, how: str) -> None:
        self.hostname = hostname
        self.local_rank = local_rank
        self.rank = rank
        self.how = how
        super().__init__(
            f"worker rank {rank} (host {hostname!r}, local rank {local_rank}) died without raising an exception: {how}"
        )


class WorkerHungError(RuntimeError):
    """Workers made no progress for `Launcher.hang_timeout` seconds.

    `stalled` maps each stuck rank to ``(hostname, seconds without progress, where)``. The
    stacks of every worker of the run were written into their log files before they were stopped.
    """

    def __init__(self, stalled: dict[int, tuple[str, float, str]], hang_timeout: float) -> None:
        self.stalled = dict(sorted(stalled.items()))
        self.ranks = list(self.stalled)
        lines = "".join(
            f"\n  rank {rank} on {host!r}: {seconds:.1f} s at {where}"
            for rank, (host, seconds, where) in self.stalled.items()
        )
        super().__init__(
            f"rank{'s' * (len(self.ranks) > 1)} {', '.join(map(str, self.ranks))} made no progress for "
            f"hang_timeout={hang_timeout:g} s:{lines}\nEvery worker's stack is in its log file."
        )


class AgentFailedError(RuntimeError):
    """The agent of a host died, could not start, or stopped answering."""

    def __init__(self, hostname: str, reason: str) -> None:
        self.hostname = hostname
        self.reason = reason
        super().__init__(f"the torchrunx agent on host {hostname!r} failed: {reason}")


class WorkerError(RuntimeError):
    """Stands in for a worker's exception that could not be carried to the launcher.

    This happens when the exception object cannot be pickled in the worker or unpickled in
    the launcher (e.g. its class only exists on the worker's host). The original type name
    and message are kept in `type_name` and `message`.
    """

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        self.message = message
        super().__init__(f"{type_name}: {message}")


def attach_remote_traceback(exc: BaseException, where: str, traceback_text: str) -> None:
    """Attach the text of a worker's traceback to `exc`, saying where it was raised."""
    note = f"\n--- raised in the worker: {where} ---\n{traceback_text.rstrip()}"
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:  # Python >= 3.11
        add_note(note)
    else:
        exc.__cause__ = _RemoteTraceback(note)


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Failure:
    """One thing that went wrong in a run: the exception to raise, and a line for the others' notes."""

    exception: BaseException
    summary: str


def combine_failures(failures: list[Failure]) -> BaseException:
    """One exception for all failures of a run, the others attached as notes.

    A dead agent or worker is the likely cause of what its peers raised (connection reset in
    a collective...), so it is preferred; otherwise the first to arrive.
    """

    def precedence(f: Failure) -> int:
        return {AgentFailedError: 0, WorkerFailedError: 1}.get(type(f.exception), 2)

    primary = min(failures, key=precedence)  # min is stable: first arrival among equals
    for other in failures:
        if other is not primary and other.summary:
            add_note(primary.exception, f"also failed: {other.summary}")
    return primary.exception


def add_note(exc: BaseException, note: str) -> None:
    """`exc.add_note(note)` where Python has it (3.11+)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


class RunInterrupted(RuntimeError):
    """The launcher received SIGTERM, SIGUSR1 or SIGUSR2 while the run was in progress.

    The signal was sent on to every worker still running (so that, e.g., a training loop can
    save a checkpoint), and the run was stopped once every worker had ended, or after
    `Launcher.signal_grace` seconds. This is raised even when every worker returned in
    time: the run was cut short from outside, whether or not the function noticed. Raised
    only when `Launcher.run` is called from the main thread (the only one where Python can
    handle signals).

    `signal` is the name of the first signal (e.g. ``"SIGUSR1"``), `signals` the names of all
    that arrived, in order. `results` holds the return values (as `Launcher.run` would have
    returned them) when every rank returned one, else None. When workers failed after the
    signal (e.g. killed by it), their combined error is the ``__cause__``.
    """

    def __init__(self, signals: Sequence[str], detail: str, results: LaunchResult | None = None) -> None:
        self.signals = list(signals)
        self.signal = self.signals[0]
        self.results = results
        also = f" (then {', '.join(self.signals[1:])})" if len(self.signals) > 1 else ""
        super().__init__(f"the run was interrupted by {self.signal}{also}: {detail}")


class WorkerExitError(WorkerFailedError):
    """A worker called ``sys.exit()`` with a non-zero code or a message (it raised `SystemExit`).

    A `WorkerFailedError` whose `how` is ``exit code N`` (the status Python exits with: the
    code, or 1 for a message); `code` is what was passed to ``sys.exit()``. A message, which
    Python prints when it exits, is in the worker's log and in this error's text.
    ``sys.exit()``, ``sys.exit(0)`` and ``sys.exit(None)`` are no error: the rank returns None.
    """

    def __init__(self, hostname: str, local_rank: int, rank: int, code: object) -> None:
        status = code if isinstance(code, int) else 1
        super().__init__(hostname, local_rank, rank, f"exit code {status}")
        self.code = code
        said = f"sys.exit({code})" if isinstance(code, int) else f"sys.exit() with the message {str(code)!r}"
        self.args = (f"worker rank {rank} (host {hostname!r}, local rank {local_rank}) called {said}: {self.how}",)


class WorkerInterruptedError(RuntimeError):
    """A worker raised `KeyboardInterrupt`: SIGINT reached that worker (e.g. ``kill -INT`` of
    its process), or its code raised it.

    A type of its own, so that ``except KeyboardInterrupt`` in the launcher's program only
    catches the program's own Ctrl-C. `hostname`, `rank` and `local_rank` name the worker; its
    traceback is attached as for any worker exception.
    """

    def __init__(self, hostname: str, local_rank: int, rank: int) -> None:
        self.hostname = hostname
        self.local_rank = local_rank
        self.rank = rank
        super().__init__(
            f"worker rank {rank} (host {hostname!r}, local rank {local_rank}) was interrupted: it raised "
            "KeyboardInterrupt (SIGINT sent to the worker's process?)"
        )


class ResultUnpicklingError(RuntimeError):
    """Every rank returned, but the launcher cannot unpickle the return value of some ranks
    (e.g. an object of a class that exists only where the workers run).

    `errors` maps each of those ranks to the unpickling error, `placement` each rank to its
    ``(hostname, local_rank)``, and `results` is a `LaunchResult` of the other ranks' return
    values. The first rank's error is the ``__cause__``.
    """

    def __init__(self, errors: Mapping[int, BaseException], results: LaunchResult) -> None:
        self.errors = dict(sorted(errors.items()))
        self.ranks = list(self.errors)
        self.results = results
        self.placement = results.placement

        def which(rank: int) -> str:
            host, local_rank = self.placement[rank]
            return f"rank {rank} (host {host!r}, local rank {local_rank})"

        first = self.errors[self.ranks[0]]
        others = f"; also {', '.join(which(r) for r in self.ranks[1:])}" if len(self.ranks) > 1 else ""
        super().__init__(
            f"the return value of {which(self.ranks[0])} cannot be unpickled in the launcher: "
            f"{type(first).__name__}: {first}{others}. The other ranks' return values are in this error's "
            "`results`; return objects whose classes the launcher can import (or plain types)"
        )
        self.__cause__ = first


def worker_exception(
    decoded: BaseException | None, type_name: str, message: str, problem: str, hostname: str, local_rank: int, rank: int
) -> BaseException:
    """The exception the launcher raises for one a worker raised.

    `decoded` is the worker's exception as unpickled in the launcher (None if that failed, and
    `problem` then says why). `SystemExit` becomes `WorkerExitError`, `KeyboardInterrupt`
    `WorkerInterruptedError`; an exception that could not be carried over becomes a
    `WorkerError` with its type's name and message.
    """
    if isinstance(decoded, SystemExit) or (decoded is None and type_name == "SystemExit"):
        return WorkerExitError(hostname, local_rank, rank, decoded.code if decoded is not None else message)
    if isinstance(decoded, KeyboardInterrupt) or (decoded is None and type_name == "KeyboardInterrupt"):
        return WorkerInterruptedError(hostname, local_rank, rank)
    if decoded is not None:
        return decoded
    error = WorkerError(type_name, message)
    add_note(error, f"(the {type_name} itself was not carried over: {problem})")
    return error
