"""Upstream torchrunx 0.4 in a virtual environment of its own, for the benchmarks to compare against.

The environment lives in ``benchmarks/.venv-upstream`` (gitignored) and is created on first use:
``python -m venv`` plus ``pip install torchrunx==0.4.0 torch==2.13.0`` (torch pinned, so that pip
takes the same CPU build as the development environment instead of pulling CUDA wheels). Later
uses only check that the pinned versions are importable there.

Upstream 0.4 has no ``torchrunx.launch`` function: its entry point is
``torchrunx.Launcher(hostnames=..., workers_per_host=..., backend=...).run(func, *args, **kwargs)``,
with logging configured by ``Launcher.set_logging_handlers`` (``None``: no log files, no console).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VERSION = "0.4.0"
TORCH = "2.13.0"
DEFAULT_VENV = Path(__file__).resolve().parent / ".venv-upstream"

_CHECK = (
    "import importlib.metadata as m, sys; "
    f"sys.exit(0 if m.version('torchrunx') == {VERSION!r} and m.version('torch').startswith({TORCH!r}) else 1)"
)


class UpstreamUnavailable(Exception):
    """The upstream environment could not be created or is broken; the message says why."""


def upstream_python(venv: Path = DEFAULT_VENV, install_timeout: float = 1800.0) -> Path:
    """Return the interpreter of the upstream 0.4 environment, creating the environment if needed."""
    python = venv / "bin" / "python"
    if python.exists() and _has_pinned_versions(python):
        return python
    print(f"upstream-0.4: creating {venv} (torchrunx=={VERSION}, torch=={TORCH}); this takes a minute", flush=True)
    _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", timeout=120)
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"torchrunx=={VERSION}", f"torch=={TORCH}"],
        "pip install", timeout=install_timeout,
    )  # fmt: skip
    if not _has_pinned_versions(python):
        raise UpstreamUnavailable(f"{venv} does not hold torchrunx=={VERSION} and torch=={TORCH} after installing")
    return python


def _has_pinned_versions(python: Path) -> bool:
    try:
        return subprocess.run([str(python), "-c", _CHECK], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run(argv: list[str], what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UpstreamUnavailable(f"{what}: {e}") from None
    if proc.returncode != 0:
        # pip's last line is often a notice; its ERROR line says what went wrong
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1])
        raise UpstreamUnavailable(f"{what} exited with {proc.returncode}: {reason}")
