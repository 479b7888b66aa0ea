"""Log throughput: 2 workers x 20,000 lines of 100 bytes, torchrunx against torchrun.

Both run as fresh commands, alternating, in the same session:

- ``python -m torch.distributed.run --nproc-per-node 2 --log-dir <dir> --tee 3
  --local-ranks-filter 0 <script>``: torchrun with its own log capture, the same job as
  torchrunx's: one file per worker stream, and local rank 0 shown on the console;
- ``python benchmarks/bench_logs.py --torchrunx-child <dir>``: ``torchrunx.launch`` on
  localhost, 2 workers, log files in ``<dir>``, rank 0 rendered on stdout.

Each rep prints both wall times and the lines lost and duplicated: for torchrun in its
worker files and on stdout (rank 0); for torchrunx in the worker files, in the agent file
(rank 0) and on stdout (rank 0). Only torchrunx's losses fail the benchmark.

    .venv/bin/python benchmarks/bench_logs.py --reps 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

LINES = 20_000
WORKERS = 2
LINE_BYTES = 100  # with the newline
_LINE = re.compile(r"rank (\d+) line (\d+) x+$")


def write_lines() -> None:
    """The workload, for both launchers: LINES lines of LINE_BYTES bytes on stdout."""
    rank = int(os.environ["RANK"])
    for i in range(LINES):
        head = f"rank {rank} line {i:06d} "
        print(head + "x" * (LINE_BYTES - 1 - len(head)))


def count(lines: list[str], ranks: list[int]) -> tuple[int, int]:
    """(lost, duplicated) lines of `ranks` among `lines`."""
    seen: Counter[tuple[int, int]] = Counter()
    for line in lines:
        m = _LINE.search(line.rstrip("\n"))
        if m:
            seen[(int(m[1]), int(m[2]))] += 1
    expected = {(r, i) for r in ranks for i in range(LINES)}
    lost = len(expected - seen.keys())
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    return lost, duplicated


def run_torchrun(workdir: Path) -> tuple[float, dict[str, tuple[int, int]]]:
    script = workdir / "worker.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from bench_logs import write_lines\nwrite_lines()\n"
    )
    logs = workdir / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORKERS)]
    command += ["--master-port", "0", "--log-dir", str(logs), "--tee", "3", "--local-ranks-filter", "0"]
    start = time.perf_counter()
    out = subprocess.run([*command, str(script)], capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    worker_files = sorted(logs.glob("*/attempt_0/*/stdout.log"))
    assert len(worker_files) == WORKERS, worker_files
    worker_lines = [line for f in worker_files for line in f.read_text().splitlines()]
    return elapsed, {
        "worker files": count(worker_lines, list(range(WORKERS))),
        "stdout": count(out.splitlines(), [0]),
    }


def run_torchrunx(workdir: Path) -> tuple[float, dict[str, tuple[int, int]]]:
    logs = workdir / "logs"
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--torchrunx-child", str(logs)], capture_output=True, text=True, check=True
    ).stdout
    elapsed = time.perf_counter() - start
    files = sorted(logs.iterdir())
    worker_files = [f for f in files if re.search(r"_\d+\.log$", f.name)]
    agent_files = [f for f in files if f not in worker_files]
    assert len(worker_files) == WORKERS and len(agent_files) == 1, files
    worker_lines = [line for f in worker_files for line in f.read_text().splitlines()]
    return elapsed, {
        "worker files": count(worker_lines, list(range(WORKERS))),
        "agent file": count(agent_files[0].read_text().splitlines(), [0]),
        "stdout": count(out.splitlines(), [0]),
    }


def torchrunx_child(logs: str) -> None:
    import torchrunx as trx

    trx.launch(write_lines, hostnames=["localhost"], workers_per_host=WORKERS, backend=None, logs=Path(logs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--torchrunx-child", metavar="LOGS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchrunx_child:
        torchrunx_child(args.torchrunx_child)
        return
    times: dict[str, list[float]] = {"torchrun": [], "torchrunx": []}
    runners = {"torchrun": run_torchrun, "torchrunx": run_torchrunx}
    print(f"{WORKERS} workers x {LINES} lines of {LINE_BYTES} bytes, {args.reps} reps, alternating")
    total_lost = 0
    for rep in range(args.reps):
        order = ["torchrun", "torchrunx"] if rep % 2 == 0 else ["torchrunx", "torchrun"]
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                elapsed, counts = runners[name](Path(tmp))
            times[name].append(elapsed)
            if name == "torchrunx":
                total_lost += sum(lost + dup for lost, dup in counts.values())
            shown = ", ".join(f"{where}: lost {lost} duplicated {dup}" for where, (lost, dup) in counts.items())
            print(f"rep {rep}  {name:<9} {elapsed:6.2f} s  {shown}", flush=True)
    t, x = statistics.median(times["torchrun"]), statistics.median(times["torchrunx"])
    print(f"median: torchrun {t:.2f} s, torchrunx {x:.2f} s, ratio {x / t:.2f} (goal <= 1.2)")
    print(f"torchrunx lines lost or duplicated, all reps: {total_lost}")
    sys.exit(1 if total_lost else 0)


if __name__ == "__main__":
    main()
