"""How user objects (the function and its arguments, return values, exceptions) travel.

cloudpickle, with two changes:

- Code objects pickled by value keep their source file name. cloudpickle >= 3.1 renames it
  ``<dynamic-code>``, so a traceback from a worker running a function of the user's script
  would show no file and no source line.
- The memory of plain CPU tensors travels out of band (pickle protocol 5): it is sent
  straight from the tensor and the receiving tensor is built over the received bytes, so a
  100 MB tensor is copied by neither pickling nor unpickling.
- Exceptions are rebuilt without calling their class's ``__init__`` (`_rebuild_exception`):
  pickle's default calls ``cls(*args)``, which fails, or garbles the message, for a class
  whose ``__init__`` takes other arguments than those it passes on to ``Exception``. Their
  ``__cause__`` and ``__context__`` travel with them (pickle's default drops both).

`dumps` returns the parts of a blob (to be sent in order, never joined); `loads` takes the
blob as received, in one piece.
"""

from __future__ import annotations

import ctypes
import io
import pickle
import struct
import types
from collections import ChainMap
from typing import Any

import cloudpickle

__all__ = ["dumps", "dumps_exception", "loads"]

_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)
_COUNT = struct.Struct("!I")
_SIZE = struct.Struct("!Q")
_ALIGN = 64  # out-of-band buffers start at multiples of this in the blob
_MIN_OUT_OF_BAND = 64 * 1024  # smaller tensors are cheaper in band


def _code_reduce_keeping_filename(code: types.CodeType) -> Any:
    assert _code_reduce is not None
    constructor, args = _code_reduce(code)
    args = tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)
    return constructor, args


def _rebuild_storage(buffer: Any) -> Any:
    import torch

    data = memoryview(buffer)
    if data.readonly:  # pickled in band: bytes, which a tensor must not write into
        data = memoryview(bytearray(data))
    return torch.frombuffer(data, dtype=torch.uint8).untyped_storage()


def _rebuild_tensor(storage: Any, dtype: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> Any:
    import torch

    return torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)


class _OutOfBandStorage:
    """Stands for one tensor storage in a pickle; every tensor viewing it refers to this one
    object, so the pickle memo rebuilds them all over one storage, as they were."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage  # keeps the memory alive until the blob is sent

    def __reduce__(self) -> tuple[Any, ...]:
        memory = (ctypes.c_char * self.storage.nbytes()).from_address(self.storage.data_ptr())
        return _rebuild_storage, (pickle.PickleBuffer(memory),)


def _rebuild_exception(
    cls: type[BaseException],
    args: tuple[Any, ...],
    state: dict[str, Any] | None,
    cause: BaseException | None,
    context: BaseException | None,
    suppress_context: bool,
) -> BaseException:
    """An exception as it was, built without its class's own ``__init__``: only the nearest
    built-in one runs (which sets ``args``, and the fields of e.g. `OSError`)."""
    builtin = next(k for k in cls.__mro__ if k.__module__ == "builtins")
    try:
        exc = cls.__new__(cls, *args)
    except Exception:  # a __new__ of the class's own, with arguments of its own
        exc = builtin.__new__(cls, *args)
    try:
        builtin.__init__(exc, *args)  # type: ignore[misc]
    except Exception:
        exc.args = args
    if state:
        exc.__setstate__(state)
    exc.__cause__, exc.__context__, exc.__suppress_context__ = cause, context, suppress_context
    return exc


def _has_builtin_reduce(cls: type) -> bool:
    """Whether `cls` pickles as Python's own exceptions do (no ``__reduce__`` of its own)."""
    for klass in cls.__mro__:
        if "__reduce_ex__" in vars(klass) or "__reduce__" in vars(klass):
            return klass.__module__ == "builtins"
    return True


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    if _code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce_keeping_filename}, cloudpickle.Pickler.dispatch_table)

    def __init__(self, file: io.BytesIO, buffers: list[pickle.PickleBuffer], chains: bool = True) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.storages: dict[int, _OutOfBandStorage] = {}  # by data pointer
        self.chains = chains  # whether exceptions keep their __cause__ and __context__

    def reducer_override(self, obj: Any) -> Any:
        if type(obj).__module__ == "torch" and type(obj).__name__ == "Tensor":
            storage = self._out_of_band_storage(obj)
            if storage is not None:
                return _rebuild_tensor, (storage, obj.dtype, obj.storage_offset(), tuple(obj.shape), obj.stride())
        elif isinstance(obj, BaseException) and _has_builtin_reduce(type(obj)):
            reduced = obj.__reduce__()
            state = reduced[2] if len(reduced) > 2 else None
            chain = (obj.__cause__, obj.__context__) if self.chains else (None, None)
            return _rebuild_exception, (type(obj), tuple(reduced[1]), state, *chain, obj.__suppress_context__)
        return super().reducer_override(obj)

    def _out_of_band_storage(self, tensor: Any) -> _OutOfBandStorage | None:
        """The storage of a plain dense CPU tensor, if it is large enough to go out of band."""
        import torch

        if (
            tensor.device.type != "cpu"
            or tensor.layout != torch.strided
            or tensor.requires_grad  # torch's own pickling knows what to do with autograd state
            or tensor.is_quantized
            or tensor.is_conj()
            or tensor.is_neg()
        ):
            return None
        storage = tensor.untyped_storage()
        if storage.nbytes() < _MIN_OUT_OF_BAND:
            return None
        key = storage.data_ptr()
        if key not in self.storages:
            self.storages[key] = _OutOfBandStorage(storage)
        return self.storages[key]


def dumps(obj: Any, *, chains: bool = True) -> list[memoryview]:
    """Pickle `obj`; the parts of the blob, in order. They point into `obj`: send them before
    changing it. `chains` False: exceptions travel without their ``__cause__`` and ``__context__``."""
    file = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    pickler = _Pickler(file, buffers, chains)
    pickler.dump(obj)
    main = file.getbuffer()
    raws = [b.raw() for b in buffers]
    table = _COUNT.pack(len(raws)) + b"".join(_SIZE.pack(n) for n in (main.nbytes, *(r.nbytes for r in raws)))
    parts: list[memoryview] = [memoryview(table), main]
    position = len(table) + main.nbytes
    for raw in raws:  # each buffer aligned, as `loads` expects
        padding = -position % _ALIGN
        if padding:
            parts.append(memoryview(bytes(padding)))
        parts.append(raw)
        position += padding + raw.nbytes
    return _Parts(parts, list(pickler.storages.values()))


def dumps_exception(exc: BaseException) -> list[memoryview]:
    """Pickle an exception with its chain of causes, or without it if some link of the chain
    cannot be pickled; raise if the exception itself cannot be."""
    try:
        return dumps(exc)
    except Exception:
        if exc.__cause__ is None and exc.__context__ is None:
            raise
        return dumps(exc, chains=False)


class _Parts(list):  # type: ignore[type-arg]
    """The parts of a blob, holding on to the storages its buffers point into."""

    def __init__(self, parts: list[memoryview], keep_alive: list[Any]) -> None:
        super().__init__(parts)
        self.keep_alive = keep_alive


def loads(blob: bytes | bytearray | memoryview) -> Any:
    """Unpickle a blob made by `dumps`. Out-of-band tensors are built over `blob`'s memory."""
    view = memoryview(blob)
    (count,) = _COUNT.unpack_from(view)
    sizes = [_SIZE.unpack_from(view, _COUNT.size + i * _SIZE.size)[0] for i in range(count + 1)]
    position = _COUNT.size + _SIZE.size * (count + 1)
    main = view[position : position + sizes[0]]
    position += sizes[0]
    buffers = []
    for size in sizes[1:]:
        position += -position % _ALIGN
        buffers.append(view[position : position + size])
        position += size
    return pickle.loads(main, buffers=buffers)
