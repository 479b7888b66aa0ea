#!/usr/bin/env python
"""What a worker's exit costs: torchrunx before and after workers ended like Python programs.

Before commit fff4040 a worker ended with ``os._exit()`` right after sending its result;
since, it joins non-daemon threads, runs ``atexit`` handlers, closes the files left open
(a walk over the objects the worker created) and only then calls ``os._exit()``. This
measures, on localhost with 4 workers (gloo, no log files, no console), per rank:

- ``exit``: from the function's return (``time.time()`` returned by the function) to the
  agent reaping the worker (the time of the agent's ``worker rank N ... ended`` record, seen
  by a log sink): pickling and sending the result, the exit steps, the process's end;
- ``run``: the wall time of ``Launcher.run`` (a no-op, from the call to the results);

for a no-op function; one that leaves 1,000,000 live objects (lists) behind; and one that
also leaves a file open for writing, so that the exit walks those objects for open files
(a worker that opened no file for writing skips the walk).

Each side is a revision (``--before``, default ``fff4040^``; ``--after``, default ``HEAD``)
checked out into a temporary ``git worktree`` and put first on ``PYTHONPATH`` (which the
launcher passes on to agents and workers), measured in a fresh interpreter; the sides
alternate, ``--rounds`` times ``--reps`` runs each.

    .venv/bin/python benchmarks/bench_exit.py --rounds 3 --reps 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trx-core", "trx-remote", "trx-logging", "torchrunx")
WORKERS = 4
_ENDED = re.compile(r"worker rank (\d+) \(local rank \d+\) ended: exit code 0")

_KEEP: list[object] = []


def noop() -> float:
    return time.time()


def many_objects() -> float:
    _KEEP.append([[] for _ in range(1_000_000)])  # alive until the worker ends
    return time.time()


def many_objects_and_a_file() -> float:
    _KEEP.append([[] for _ in range(1_000_000)])
    _KEEP.append(open(os.devnull, "w"))  # noqa: SIM115 - left open: the exit walks the objects for it
    return time.time()


WORKLOADS = {
    "no-op": noop,
    "1M live objects": many_objects,
    "1M live objects, a file left open": many_objects_and_a_file,
}


def measure(reps: int) -> dict[str, dict[str, list[float]]]:
    """In this interpreter, with whatever torchrunx it imports: samples in ms per workload."""
    import torchrunx as trx
    from torchrunx import LogRecord

    ended: dict[int, float] = {}

    def sink(record: LogRecord) -> None:
        if record.stream == "agent" and (match := _ENDED.search(record.message)):
            ended[int(match[1])] = record.time

    # hang_timeout: before ad0b69d, a worker forked while agent 0's store thread held glibc's
    # resolver lock hung at its first name lookup (see benchmarks/README.md); such a run is
    # counted and redone.
    launcher = trx.Launcher(
        hostnames=["localhost"],
        workers_per_host=WORKERS,
        backend="gloo",
        logs=None,
        log_console=None,
        hang_timeout=10,
    )
    samples: dict[str, dict[str, list[float]]] = {}
    with trx.add_sink(sink):
        for name, func in WORKLOADS.items():
            exits, runs, hung, warm = [], [], 0, False
            while len(runs) < reps:
                ended.clear()
                start = time.perf_counter()
                try:
                    returned = launcher.run(func)
                except trx.WorkerHungError:
                    hung += 1
                    continue
                elapsed = (time.perf_counter() - start) * 1000
                if not warm:  # the first run is a warm-up, untimed
                    warm = True
                    continue
                runs.append(elapsed)
                exits.extend((ended[rank] - returned[rank]) * 1000 for rank in range(WORKERS))
            samples[name] = {"exit": exits, "run": runs, "hung": [float(hung)]}
    return samples


def run_side(pythonpath: str, reps: int) -> dict[str, dict[str, list[float]]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--measure", out.name, "--reps", str(reps)]
        subprocess.run(command, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=1800)
        result: dict[str, dict[str, list[float]]] = json.loads(Path(out.name).read_text())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="fff4040^", help="the revision measured as 'before' (os._exit at once)")
    parser.add_argument("--after", default="HEAD", help="the revision measured as 'after'")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one side, into this file
    args = parser.parse_args()
    if args.measure:
        Path(args.measure).write_text(json.dumps(measure(args.reps)))
        return

    revisions = {side: _short(rev) for side, rev in (("before", args.before), ("after", args.after))}
    trees = {side: Path(tempfile.mkdtemp(prefix=f"bench-exit-{side}-")) for side in revisions}
    try:
        for side, tree in trees.items():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), revisions[side]], cwd=ROOT, check=True)
        sides: dict[str, dict[str, dict[str, list[float]]]] = {"before": {}, "after": {}}
        for round_ in range(args.rounds):
            order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
            for side in order:
                path = os.pathsep.join(str(trees[side] / "packages" / p / "src") for p in PACKAGES)
                for workload, metrics in run_side(path, args.reps).items():
                    for metric, values in metrics.items():
                        sides[side].setdefault(workload, {}).setdefault(metric, []).extend(values)
                print(f"round {round_ + 1}/{args.rounds}: {side} done", file=sys.stderr)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)

    print(
        f"\nN={WORKERS} on localhost, gloo; medians (p10-p90) in ms; "
        f"before = {revisions['before']}, after = {revisions['after']}\n"
    )
    print("| workload | metric | before | after | added |\n|---|---|---|---|---|")
    for workload in WORKLOADS:
        for metric, label in (("exit", "return → reaped, per rank"), ("run", "run() wall time")):
            b, a = sides["before"][workload][metric], sides["after"][workload][metric]
            print(
                f"| {workload} | {label} | {_summary(b)} | {_summary(a)} | "
                f"{statistics.median(a) - statistics.median(b):+.1f} |"
            )
    hung = {side: sum(sum(m["hung"]) for m in sides[side].values()) for side in sides}
    print(f"\nruns redone because a worker hung at its start: before {hung['before']:.0f}, after {hung['after']:.0f}")
    if args.json:
        args.json.write_text(json.dumps({"revisions": revisions, "samples": sides}, indent=1))


def _short(revision: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or revision


def _summary(values: list[float]) -> str:
    deciles = statistics.quantiles(values, n=10)
    return f"{statistics.median(values):.1f} ({deciles[0]:.1f}-{deciles[-1]:.1f})"


if __name__ == "__main__":
    main()
