"""Doing one thing for several hosts at once (each may wait on a network)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["each"]

_T = TypeVar("_T")
_R = TypeVar("_R")


def each(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[tuple[_R | None, str]]:
    """`fn` on every item, in parallel when there are several (each may wait on a network):
    per item, its outcome or the error it raised."""

    def capture(item: _T) -> tuple[_R | None, str]:
        try:
            return fn(item), ""
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"

    if len(items) <= 1:
        return [capture(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), 64)) as pool:
        return list(pool.map(capture, items))
