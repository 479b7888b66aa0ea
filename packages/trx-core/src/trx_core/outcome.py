"""What a run's end becomes: its `LaunchResult`, or the error that says how it was cut short."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from . import _pickling, processes
from .errors import Failure, ResultUnpicklingError, RunInterrupted, combine_failures
from .results import LaunchResult

__all__ = ["decode_results", "interruption"]


def decode_results(
    blobs: Mapping[int, bytearray], placement: Sequence[tuple[str, int]], phases: Mapping[str, float] | None = None
) -> LaunchResult:
    """Unpickle every rank's return value; `ResultUnpicklingError` names the ranks whose value
    cannot be (e.g. its class only imports on the workers' hosts) and keeps the others'."""
    values, broken = {}, {}
    for rank, blob in blobs.items():
        try:
            values[rank] = _pickling.loads(blob)
        except Exception as e:
            broken[rank] = e
    if broken:
        raise ResultUnpicklingError(broken, LaunchResult(values, placement))
    return LaunchResult(values, placement, phases)


def interruption(
    signals: Sequence[int],
    forwarded: bool,
    failures: list[Failure],
    placement: Sequence[tuple[str, int]],
    blobs: Mapping[int, bytearray],
    exits: Mapping[int, str],
    grace: float,
) -> RunInterrupted:
    """The error of a run that `signals` interrupted (`forwarded`: sent on to its workers),
    saying how each rank ended; what failed meanwhile becomes its cause."""
    names = [processes.signal_name(s) for s in signals]
    cause = combine_failures(failures) if failures else None
    if not forwarded:
        error = RunInterrupted(names, "the agents were still starting; the run was stopped at once")
        error.__cause__ = cause
        return error
    ranks = len(placement)
    running = [rank for rank in range(ranks) if rank not in exits]  # stopped by us, or lost
    results = None
    if ranks and len(blobs) == ranks:
        with contextlib.suppress(Exception):  # then the cause says what went wrong
            results = LaunchResult({r: _pickling.loads(b) for r, b in blobs.items()}, placement)
    limit = f"signal_grace={grace:g} s"
    if running:
        plural = "s" * (len(running) > 1)
        how = f"the run was stopped after {limit}, with rank{plural} {', '.join(map(str, running))} still running"
    else:
        how = f"every worker ended within {limit}"
    endings: dict[str, int] = {}
    for rank in range(ranks):
        ending = "returned" if rank in blobs else exits.get(rank)
        if ending is not None:
            endings[ending] = endings.get(ending, 0) + 1
    summary = ", ".join(f"{count} {ending}" for ending, count in endings.items())
    detail = f"it was sent on to every worker, and {how}" + (f" ({summary})" if summary else "")
    error = RunInterrupted(names, detail, results)
    error.__cause__ = cause
    return error
