#!/usr/bin/env python
"""Multi-host cold launch: 2 hosts x 2 workers over SSH, against references from the same run.

Builds the test bed of ``tests/multihost.py`` (two network namespaces, each with its own sshd
and hostname; needs root and openssh-server), then measures, alternating between the
launchers and rotating which goes first in every repetition:

- ``torchrunx 2x2 ssh``: ``trx.launch(all_reduce_once, hostnames=["host1", "host2"],
  workers_per_host=2, ssh_config_file=<bed>, backend="gloo", logs=None)`` — from the call to
  its return: SSH connections, agents (each imports torch), 4 forked workers, one process
  group across the hosts, one all_reduce, results back, everything stopped.
- ``torchrun 2x2 ssh``: what a user would otherwise do — OpenSSH's ``ssh`` to both hosts at
  once, each running ``python -m torch.distributed.run --nnodes 2 --node-rank I
  --nproc-per-node 2 --master-addr <host1> --master-port <free>`` on a script doing the same
  init + all_reduce + destroy; from starting both ``ssh`` to both exiting.
- ``torchrunx 1x4 local``: the torchrunx launch of the same function on localhost with 4
  workers (no SSH, no second host).

Each launch is made from this one long-lived process (torch already imported); one untimed
launch of each kind comes first. Prints median / min / max per launcher and the ratios of
torchrunx's median to each reference. A measuring tool, not a test: it exits 0 whatever the
numbers are.

Run (as root, from the repository root):  .venv/bin/python benchmarks/bench_multihost.py [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torchrunx as trx
from multihost import TestBed, testbed

TORCHRUN_SCRIPT = """\
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size()
dist.destroy_process_group()
"""


def all_reduce_once() -> float:
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def torchrunx_on_hosts(bed: TestBed) -> Callable[[], None]:
    def run() -> None:
        results = trx.launch(
            all_reduce_once, hostnames=bed.aliases, workers_per_host=2, ssh_config_file=bed.ssh_config,
            backend="gloo", logs=None, log_console=None, timeout=60,
        )  # fmt: skip
        assert [results[r] for r in range(4)] == [4.0] * 4

    return run


def torchrunx_local() -> None:
    results = trx.launch(all_reduce_once, hostnames=["localhost"], workers_per_host=4, backend="gloo", logs=None,
                         log_console=None, timeout=60)  # fmt: skip
    assert [results[r] for r in range(4)] == [4.0] * 4


def torchrun_over_ssh(bed: TestBed, script: Path) -> Callable[[], None]:
    def run() -> None:
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        procs = []
        for i, host in enumerate(bed.hosts):
            command = (
                f"cd {os.getcwd()} && exec {sys.executable} -m torch.distributed.run --nnodes 2 --node-rank {i} "
                f"--nproc-per-node 2 --master-addr {bed.hosts[0].address} --master-port {port} {script}"
            )
            argv = ["ssh", "-F", str(bed.ssh_config), host.alias, command]
            procs.append(
                subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"torchrun over ssh failed ({proc.returncode}): {err.decode()[-2000:]}")

    return run


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-multihost-") as tmp, testbed(Path(tmp) / "bed", n=2) as bed:
        script = Path(tmp) / "torchrun_all_reduce.py"
        script.write_text(TORCHRUN_SCRIPT)
        launchers = {
            "torchrunx 2x2 ssh": torchrunx_on_hosts(bed),
            "torchrun 2x2 ssh": torchrun_over_ssh(bed, script),
            "torchrunx 1x4 local": torchrunx_local,
        }
        for fn in launchers.values():  # warm-up, untimed
            fn()
        samples: dict[str, list[float]] = {name: [] for name in launchers}
        names = list(launchers)
        for rep in range(args.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                samples[name].append(timed(launchers[name]))
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in samples.items()))
        leftovers = bed.wait_no_leftovers()
    print(f"\ncold launch, 2 hosts x 2 workers (gloo all_reduce), {args.reps} reps, {socket.gethostname()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")  # fmt: skip
    print(f"{'launcher':<22}{'median':>9}{'min':>9}{'max':>9}")
    medians = {name: statistics.median(s) for name, s in samples.items()}
    for name, s in samples.items():
        print(f"{name:<22}{medians[name]:>8.2f}s{min(s):>8.2f}s{max(s):>8.2f}s")
    ours = medians["torchrunx 2x2 ssh"]
    for ref in ("torchrun 2x2 ssh", "torchrunx 1x4 local"):
        print(f"ratio torchrunx 2x2 ssh / {ref}: {ours / medians[ref]:.2f}")
    if leftovers:
        print(f"ANOMALY: processes left on the hosts: {leftovers}")


if __name__ == "__main__":
    main()
