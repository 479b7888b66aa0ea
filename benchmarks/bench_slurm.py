#!/usr/bin/env python
"""Cold launch inside a SLURM job: the srun executor against the SSH executor, 2 hosts x 2 workers.

Builds the SLURM test bed of ``tests/slurmbed.py`` (slurmctld, and a slurmd and an sshd on each
of two network-namespace hosts; needs root, openssh-server, slurmctld, slurmd, slurm-client and
munge), submits one batch job (``-N2 --ntasks-per-node=2``) that runs this script again with
``--inside``, and prints what the job measured. Inside the job, from one long-lived launcher
process (torch already imported), after one untimed launch of each kind:

- ``slurm``: ``trx.launch(noop, hostnames="slurm", workers_per_host="auto", executor="slurm",
  backend=...)`` — from the call to its return: two ``srun --overlap`` job steps, agents
  (each imports torch), 4 forked workers, a process group across the hosts, results back,
  every step ended.
- ``ssh``: the same with ``executor="ssh"`` and the bed's ssh config (paramiko, two SSH
  connections, agents outside the job's steps).
- ``srun true`` / ``ssh true``: the bare cost of starting a command on the second host each way
  (``srun --overlap -N1 -n1 -w host2 true``; OpenSSH's ``ssh -F <bed> host2 true``).

Launches alternate between the executors, and which goes first rotates in every repetition.
Prints median / min / max per row. A measuring tool, not a test: it exits 0 whatever the numbers.

Run (as root, from the repository root):  .venv/bin/python benchmarks/bench_slurm.py [--reps 10]

Last measured (2 cores shared with other test runs, load average 3.4-4.0; --reps 15, gloo), seconds:

                                   median      min      max
    torchrunx 2x2 executor=slurm    1.488    1.176    2.829
    torchrunx 2x2 executor=ssh      1.430    1.304    2.795
    srun true (host2)               0.033    0.026    0.089
    ssh true (host2)                0.207    0.201    0.352

A step starts in ~30 ms where an SSH command takes ~200 ms, but a launch is dominated by the
agents' and workers' start-up (torch import, fork, process group): on this loaded machine the two
executors' medians are within noise of each other (a run with --reps 10 gave 1.607 vs 1.559 s).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def noop() -> None:
    return None


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_inside(reps: int, ssh_config: str, backend: str | None) -> dict[str, list[float]]:
    """In the job: time launches with each executor, and bare srun / ssh commands."""
    import torchrunx as trx

    def launch(executor: str) -> Callable[[], object]:
        extra = {"ssh_config_file": ssh_config} if executor == "ssh" else {}
        return lambda: trx.launch(
            noop, hostnames="slurm", workers_per_host="auto", executor=executor, backend=backend,
            logs=None, log_console=None, timeout=60, **extra,
        )  # fmt: skip

    def command(argv: list[str]) -> Callable[[], object]:
        return lambda: subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)

    rows = {
        "torchrunx 2x2 executor=slurm": launch("slurm"),
        "torchrunx 2x2 executor=ssh": launch("ssh"),
        "srun true (host2)": command(["srun", "--overlap", "-N1", "-n1", "-w", "host2", "--quiet", "true"]),
        "ssh true (host2)": command(["ssh", "-F", ssh_config, "host2", "true"]),
    }
    for fn in rows.values():  # warm-up, untimed
        fn()
    samples: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            samples[name].append(timed(rows[name]))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--backend", default="gloo", help="process-group backend of the launches ('none' for none)")
    parser.add_argument("--inside", metavar="JSON", help=argparse.SUPPRESS)  # the job's side; writes samples there
    parser.add_argument("--ssh-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    backend = None if args.backend == "none" else args.backend
    if args.inside:
        samples = measure_inside(args.reps, args.ssh_config, backend)
        Path(args.inside).write_text(json.dumps(samples))
        return

    from slurmbed import slurm_cluster

    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp, slurm_cluster(Path(tmp) / "cluster") as cluster:
        output = Path(tmp) / "samples.json"
        argv = [
            sys.executable, str(Path(__file__).resolve()), "--reps", str(args.reps), "--backend", args.backend,
            "--inside", str(output), "--ssh-config", str(cluster.hosts.ssh_config),
        ]  # fmt: skip
        job = cluster.sbatch(
            f"cd {shlex.quote(str(Path.cwd()))}\nexec {shlex.join(argv)}", ["-N2", "--ntasks-per-node=2"], timeout=3600
        )
        if not output.exists():
            sys.exit(f"the benchmark job failed (sbatch exit {job.returncode}):\n{job.output}")
        samples = json.loads(output.read_text())
    print(f"cold launch inside a SLURM job, 2 hosts x 2 workers, backend={args.backend}, {args.reps} reps")
    print(f"{'':32} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in samples.items():
        print(f"{name:32} {statistics.median(values):8.3f} {min(values):8.3f} {max(values):8.3f}")
    slurm, ssh = (statistics.median(samples[f"torchrunx 2x2 executor={e}"]) for e in ("slurm", "ssh"))
    print(f"executor=slurm / executor=ssh (medians): {slurm / ssh:.2f}")


if __name__ == "__main__":
    main()
