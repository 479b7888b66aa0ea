"""The device check script (benchmarks/gpu_check.py) keeps working where there is no GPU:
its CPU smoke run passes and every GPU check says it was skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
GPU_CHECKS = {
    "cold start with CUDA",
    "workers_per_host=gpu",
    "current device = local rank",
    "backend auto = nccl",
    "nccl all_reduce",
    "agent has no CUDA context",
    "sigkill in nccl collective",
    "no GPU memory left after kill",
    "two workers on one GPU",
    "warm session",
    "1 GiB CUDA return",
}
CPU_CHECKS = {"cpu all_reduce", "cpu sigkill"}


@pytest.mark.timeout(180)
def test_gpu_check_cpu_only_run_passes_its_smoke_checks_and_skips_the_gpu_ones() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-only", "--budget", "150"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    verdicts = {}
    for line in done.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            verdicts[rest.partition(": ")[0]] = status
    assert verdicts == {**dict.fromkeys(GPU_CHECKS, "SKIP"), **dict.fromkeys(CPU_CHECKS, "PASS")}, output
