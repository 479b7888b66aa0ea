"""`LaunchResult`: the return values of every worker of a run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["LaunchResult"]


class LaunchResult(Mapping[int, Any]):
    """Return values by global rank: ``results[0]``, ``dict(results)``, ``len(results)``.

    ``placement[rank]`` is the ``(hostname, local_rank)`` where that rank ran. ``phases`` says
    where the run's time went: seconds from the start of the run to the end of each phase of
    its start-up (``agents started``: the executor started them, e.g. ssh is running;
    ``agents connected``: every agent logged in and connected back; ``agents ready``: every
    agent imported torch; ``workers started``: forked; ``group formed``: every rank has its
    process group and calls the function) and to its end (``returned``). A run of a warm
    session starts from ready agents: its phases begin at ``workers started``.
    """

    def __init__(
        self,
        values: Mapping[int, Any],
        placement: Sequence[tuple[str, int]],
        phases: Mapping[str, float] | None = None,
    ) -> None:
        self._values = dict(values)
        self.placement: tuple[tuple[str, int], ...] = tuple(placement)
        self.phases: dict[str, float] = dict(phases or {})

    def __getitem__(self, rank: int) -> Any:
        return self._values[rank]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def rank(self, i: int) -> Any:
        """The return value of global rank `i`."""
        return self._values[i]

    def index(self, hostname: str, local_rank: int) -> Any:
        """The return value of the worker with `local_rank` on `hostname`."""
        try:
            return self._values[self.placement.index((hostname, local_rank))]
        except ValueError:
            hosts = sorted({h for h, _ in self.placement})
            raise KeyError(f"no worker with local rank {local_rank} on host {hostname!r} (hosts: {hosts})") from None

    @property
    def hostnames(self) -> list[str]:
        """The hosts of the run, in order."""
        return list(dict.fromkeys(h for h, _ in self.placement))

    def __repr__(self) -> str:
        return f"LaunchResult({self._values!r})"
