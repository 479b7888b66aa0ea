"""What the libraries a worker runs see: torchrun's environment, the launcher's ``sys.argv``
and ``sys.path``, the user's script as ``__main__``, a share of the host's CPU threads, the
GPU of the worker's local rank, and the process group."""

from __future__ import annotations

import os
import sys
import types
from datetime import timedelta
from typing import Any

from .protocol import WorkerSpec

__all__ = ["become_like_torchrun_worker", "init_process_group", "mirror_main", "use_own_gpu"]


def become_like_torchrun_worker(spec: WorkerSpec) -> None:
    """What libraries expect of a torchrun worker: its environment, ``sys.argv`` and ``sys.path``
    as the launcher's, and torch's CPU threads shared among the host's workers."""
    os.environ.update(spec.env)
    for name in spec.unset:
        os.environ.pop(name, None)
    sys.path[:] = [*spec.sys_path, *(p for p in sys.path if p not in spec.sys_path)]
    sys.argv[:] = list(spec.argv) or [""]
    _share_cpu_threads(spec)


def mirror_main(func: Any, main_path: str | None) -> None:
    """Make ``__main__`` a module like the launcher's script, holding what the function uses.

    Objects defined in the user's script travel by value and come out with ``__module__`` set
    to ``__main__``. With them in this process's ``__main__``, pickling by reference works in
    the worker's own children (multiprocessing, DataLoader workers), and a spawned child
    re-imports the script as ``__mp_main__`` from ``__file__``, as it would under torchrun.
    The script itself is not run here: that would repeat its top level in every worker.
    """
    main = types.ModuleType("__main__")
    if main_path is not None:
        main.__file__ = main_path
    main.__dict__["__builtins__"] = __builtins__
    if getattr(func, "__module__", None) == "__main__":
        main.__dict__.update(getattr(func, "__globals__", {}))
        main.__dict__.setdefault(getattr(func, "__name__", "func"), func)
    main.__dict__["__name__"] = "__main__"
    sys.modules["__main__"] = main


def _share_cpu_threads(spec: WorkerSpec) -> None:
    """Give each worker its share of the host's cores for CPU threads, as torchrun does.

    Otherwise every worker (and each of its own subprocesses) starts one thread per core and
    N workers oversubscribe the host N times over. An explicit ``OMP_NUM_THREADS`` (forwarded
    by the default ``env_vars``) wins; otherwise it is exported, so the worker's children get
    it too.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    local_world_size = int(spec.env.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def use_own_gpu(spec: WorkerSpec) -> None:
    """With CUDA, the worker's current device is the GPU of its local rank (when there is one)."""
    import torch

    if torch.cuda.is_available() and spec.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(spec.local_rank)


def init_process_group(spec: WorkerSpec) -> None:
    import torch
    import torch.distributed as dist

    backend = spec.backend
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=spec.timeout)
    world_size = int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, world_size, False, timeout)  # type: ignore[attr-defined]
    dist.init_process_group(backend, store=store, rank=spec.rank, world_size=world_size, timeout=timeout)
    if backend != "nccl":
        # Gloo connects its full mesh during init; a rank whose function returns at once would
        # otherwise close its sockets while a peer is still connecting to it.
        dist.barrier()
