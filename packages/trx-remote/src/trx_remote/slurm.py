"""SLURM discovery: the hosts of the current allocation, and how many workers each gets.

`SlurmDiscovery` is registered in the ``torchrunx.host_discovery`` entry-point group as
``slurm``; trx-core uses it for ``hostnames="slurm"``, and for ``"auto"`` when it applies
(inside an allocation).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

from trx_core import ConfigurationError

__all__ = ["SlurmDiscovery", "expand_counts", "expand_hostlist", "slurm_hostnames", "slurm_workers_per_host"]

_SCONTROL_TIMEOUT_S = 10.0


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced '[' in {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str) -> list[str]:
    """``01-04,07`` -> ``['01', '02', '03', '04', '07']`` (zero padding kept)."""
    values = []
    for item in body.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {item!r}")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"range {item!r} goes backwards")
        width = len(low)
        values += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed hostlist syntax, e.g. ``gpu-[01-04,07],cpu1``.

    Several bracket groups in one name give their product (``r[1-2]n[1-2]`` -> r1n1, r1n2,
    r2n1, r2n2), in SLURM's order.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        pieces = re.split(r"\[([^\]]*)\]", name)  # literal, range, literal, range, ..., literal
        choices = [[piece] if i % 2 == 0 else _expand_range(piece) for i, piece in enumerate(pieces)]
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    return hosts


def expand_counts(counts: str) -> list[int]:
    """Expand SLURM's per-node counts, e.g. ``SLURM_TASKS_PER_NODE=2(x3),1`` -> [2, 2, 2, 1]."""
    values: list[int] = []
    for item in counts.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"bad count {item!r} in {counts!r}")
        values += [int(match[1])] * int(match[2] or 1)
    return values


def slurm_hostnames(environ: Mapping[str, str] | None = None) -> list[str]:
    """The hosts of the SLURM allocation this process runs in.

    Uses ``scontrol show hostnames`` when it is installed, else parses ``SLURM_JOB_NODELIST``.
    """
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigurationError(
            "hostnames='slurm' but this process is not inside a SLURM allocation (SLURM_JOB_NODELIST is "
            "not set): run it under salloc/sbatch/srun, or pass hostnames=[...]"
        )
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=_SCONTROL_TIMEOUT_S,
                check=True,
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass  # the parser below knows the syntax too
    try:
        return expand_hostlist(nodelist)
    except ValueError as e:
        raise ConfigurationError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}: {e}") from None


def slurm_workers_per_host(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """Workers per host of the allocation, in the order of `slurm_hostnames`, when SLURM says.

    One per task when tasks were asked for (``--ntasks-per-node``: ``SLURM_NTASKS_PER_NODE``;
    ``--ntasks``: ``SLURM_TASKS_PER_NODE``), else one per GPU when GPUs were
    (``SLURM_GPUS_ON_NODE``, ``SLURM_GPUS_PER_NODE``). None outside an allocation or when
    SLURM says neither: each host then gets what ``workers_per_host="auto"`` gives anywhere.
    ``SLURM_TASKS_PER_NODE`` alone is not enough: SLURM sets it to 1 for every allocation.

    trx-core uses it (through `SlurmDiscovery`) for ``workers_per_host="auto"`` on hosts it got
    from SLURM.
    """
    environ = os.environ if environ is None else environ
    if not (environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")):
        return None
    n_hosts = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 0) or len(
        slurm_hostnames(environ)
    )
    try:
        if environ.get("SLURM_NTASKS_PER_NODE"):
            return [int(environ["SLURM_NTASKS_PER_NODE"])] * n_hosts
        if environ.get("SLURM_NTASKS") and environ.get("SLURM_TASKS_PER_NODE"):
            return expand_counts(environ["SLURM_TASKS_PER_NODE"])
        for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
            if environ.get(name):  # "4", or "a100:4" for a GPU type
                return [int(environ[name].rpartition(":")[2])] * n_hosts
    except ValueError as e:
        raise ConfigurationError(f"cannot read the SLURM allocation's tasks or GPUs per node: {e}") from None
    return None


class SlurmDiscovery:
    """trx-core's host discovery for SLURM: applies inside an allocation (``SLURM_JOB_NODELIST`` set)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def applies(self) -> bool:
        return bool(self._environ.get("SLURM_JOB_NODELIST") or self._environ.get("SLURM_NODELIST"))

    def hostnames(self) -> list[str]:
        return slurm_hostnames(self._environ)

    def workers_per_host(self) -> list[int] | None:
        return slurm_workers_per_host(self._environ)
