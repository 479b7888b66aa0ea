"""cloudpickle, keeping the source file names of functions pickled by value.

cloudpickle >= 3.1 renames the file of every code object it pickles by value to
``<dynamic-code>``, so a traceback from a worker running a function of the user's script
would show no file and no source line. We put the real file name back.
"""

from __future__ import annotations

import io
import types
from collections import ChainMap
from typing import Any

import cloudpickle

__all__ = ["dumps"]

_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


def _code_reduce_keeping_filename(code: types.CodeType) -> Any:
    assert _code_reduce is not None
    constructor, args = _code_reduce(code)
    args = tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)
    return constructor, args


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    if _code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce_keeping_filename}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """Pickle `obj` like ``cloudpickle.dumps`` (highest protocol), keeping code file names."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue()
