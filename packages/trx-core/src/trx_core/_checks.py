"""Checks of a launch's settings and call, made before any process starts."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "call_arguments",
    "check_environment_size",
    "check_log_file_names",
    "check_numpy_torch_versions",
    "is_variable_name",
    "validate_workers_per_host",
]

# Linux's bound on one NAME=VALUE string in the environment of a program it starts
# (MAX_ARG_STRLEN: 32 pages of 4 KiB); execve() fails with "Argument list too long" beyond it.
MAX_VARIABLE_BYTES = 32 * 4096
# Room left under ARG_MAX for the agent's command line (its start script) and a login's variables.
_COMMAND_LINE_ROOM = 64 * 1024


def call_arguments(
    func_kwargs: object, func_args: object, unexpected: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The function's positional and keyword arguments; the call forms of upstream torchrunx
    (0.2: ``launch(func, (1, 2))``; 0.4: ``launcher.run(func, config, key=value)``) are refused
    saying what to write instead."""
    if unexpected:
        raise ConfigurationError(
            f"run() got keyword arguments {sorted(unexpected)} for the function: pass them as a dict, "
            f"run(func, {{{', '.join(repr(k) + ': ...' for k in unexpected)}}}) (upstream torchrunx 0.4's "
            "run(func, *args, **kwargs) form is written run(func, func_kwargs, func_args=args) here)"
        )
    if func_kwargs is not None and not isinstance(func_kwargs, Mapping):
        kind = type(func_kwargs).__name__
        hint = (
            f"func_args={func_kwargs!r}"
            if isinstance(func_kwargs, (tuple, list))
            else f"func_args=({type(func_kwargs).__name__}(...),)"
        )
        raise ConfigurationError(
            f"the second argument is the function's keyword arguments (a dict), got a {kind}: for positional "
            f"arguments write {hint}, e.g. launch(func, func_args=(1, 2)) or launcher.run(func, func_args=(config,))"
        )
    if isinstance(func_args, (str, bytes, Mapping)) or not (func_args is None or isinstance(func_args, Sequence)):
        raise ConfigurationError(
            f"func_args must be a tuple or list of positional arguments, got {type(func_args).__name__}: "
            f"to pass one object write func_args=(obj,)"
        )
    return tuple(func_args or ()), dict(func_kwargs or {})


def validate_workers_per_host(value: object, hostnames: object) -> None:
    def _check_count(n: object) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigurationError(f"workers_per_host must be positive whole numbers, got {n!r}")

    if isinstance(value, str):
        if value not in ("auto", "gpu", "cpu"):
            raise ConfigurationError(
                f"workers_per_host={value!r} is not valid: use a number, a list of numbers, 'auto', 'gpu' or 'cpu'"
            )
    elif isinstance(value, (list, tuple)):
        for n in value:
            _check_count(n)
        if isinstance(hostnames, (list, tuple)) and len(value) != len(hostnames):
            raise ConfigurationError(
                f"workers_per_host has {len(value)} entries but hostnames has {len(hostnames)}: "
                "give one count per host, or a single number for all"
            )
    else:
        _check_count(value)


def _major_minor(text: str) -> tuple[int, int]:
    parts = text.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0) if len(parts) > 1 else 0


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_numpy_torch_versions(numpy_version: str | None = None, torch_version: str | None = None) -> None:
    """NumPy >= 2.0 only works with torch >= 2.3: refuse the bad pair up front.

    The versions default to the installed ones.
    """
    numpy_version = numpy_version or _installed("numpy")
    torch_version = torch_version or _installed("torch")
    if not (numpy_version and torch_version):
        return
    try:
        bad = _major_minor(numpy_version) >= (2, 0) and _major_minor(torch_version) < (2, 3)
    except ValueError:
        return  # a version we cannot read: let the import itself say what is wrong
    if bad:
        raise ConfigurationError(
            f"NumPy {numpy_version} needs torch >= 2.3, but torch {torch_version} is installed: "
            "upgrade torch (pip install 'torch>=2.3') or install 'numpy<2'"
        )


def is_variable_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "=" not in name and "\0" not in name


def check_environment_size(env: Mapping[str, str]) -> None:
    """Refuse variables that no host could start the agent with, naming them: one over
    `MAX_VARIABLE_BYTES`, or all together over this machine's ``ARG_MAX``."""
    sizes = {name: len(os.fsencode(name)) + len(os.fsencode(value)) + 2 for name, value in env.items()}
    advice = "pass large data as a function argument or in a file, and leave the variable out of env_vars"
    for name, size in sizes.items():
        if size > MAX_VARIABLE_BYTES:
            raise ConfigurationError(
                f"environment variable {name} is {size / 1024:.0f} KiB: Linux starts no program with a variable over "
                f"{MAX_VARIABLE_BYTES // 1024} KiB (MAX_ARG_STRLEN), so no agent could start with it: {advice} "
                "(and extra_env_vars)"
            )
    limit = os.sysconf("SC_ARG_MAX") - _COMMAND_LINE_ROOM
    if sum(sizes.values()) > limit:
        largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:3]
        raise ConfigurationError(
            f"the variables sent to every agent take {sum(sizes.values()) / 1024:.0f} KiB, over the "
            f"{limit // 1024} KiB a program can be started with here (ARG_MAX); the largest are "
            f"{', '.join(f'{n} ({sizes[n] / 1024:.0f} KiB)' for n in largest)}: {advice}"
        )


def check_log_file_names(hostnames: object, workers_per_host: object) -> None:
    """Refuse hosts whose log files would have the same name: with hosts ``node`` and
    ``node_0``, the file of the first's worker 0 is the second's agent file
    (``<start>_node_0.log``). Checked here for the counts known before the agents start;
    trx-logging checks again once every count is known."""
    if not isinstance(hostnames, (list, tuple)):
        return
    if isinstance(workers_per_host, int):
        counts: list[int] = [workers_per_host] * len(hostnames)
    elif isinstance(workers_per_host, (list, tuple)):
        counts = list(workers_per_host)
    else:
        counts = [1] * len(hostnames)  # "auto", "gpu", "cpu": at least one worker
    names = set(hostnames)
    for host, count in zip(hostnames, counts, strict=False):
        for local_rank in range(count):
            other = f"{host}_{local_rank}"
            if other in names:
                raise ConfigurationError(
                    f"hosts {host!r} and {other!r} would write into the same log file (<start>_{other}.log: the "
                    f"file of {host!r}'s worker {local_rank}, and {other!r}'s agent file): rename one of them "
                    "(e.g. with a Host alias in the ssh config), or set logs=None"
                )
