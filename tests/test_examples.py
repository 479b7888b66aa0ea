"""The scripts in examples/ do what their docstrings and the documentation say, run as a
user runs them: ``python examples/<script>.py ...`` in a folder of the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multihost import TestBed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Run an example in `cwd` with its logs in `cwd`/logs; its stdout, or fail with its output."""
    env = {**os.environ, "TORCHRUNX_LOG_DIR": str(cwd / "logs"), "COLUMNS": "100"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_ddp_quick_start_trains_on_two_workers_and_loads_rank_0s_checkpoint(tmp_path: Path) -> None:
    out = run_example("ddp_train.py", "--epochs", "5", "--checkpoint-dir", "ckpt", cwd=tmp_path)
    assert "[localhost rank 0] epoch   5  loss" in out  # rank 0's output on the console
    assert "checkpoint from rank 0: ckpt/ddp_train.pt" in out
    assert (tmp_path / "ckpt" / "ddp_train.pt").is_file()


def test_two_stage_example_trains_on_two_workers_then_evaluates_on_one(tmp_path: Path) -> None:
    out = run_example("two_stage.py", "--epochs", "3", cwd=tmp_path)
    assert "stage 1: 2 workers trained" in out
    assert "stage 2: 1 worker evaluated it: accuracy" in out  # the script fails below 0.8 itself
    assert "started worker rank 1" not in out.split("stage 1:")[1]  # stage 2 ran one worker


def test_sweep_retries_a_lost_worker_skips_a_diverging_configuration_and_reports_the_best(tmp_path: Path) -> None:
    out = run_example("sweep.py", "--simulate-preemption", "--epochs", "20", cwd=tmp_path)
    lines = [line for line in out.splitlines() if line.startswith(("lr=", "best:"))]
    assert lines[0] == "lr=0.01: attempt 1 lost a worker (killed by signal SIGKILL on localhost), retrying"
    assert lines[1].startswith("lr=0.01: loss ")
    assert lines[2].startswith("lr=0.1: loss ")
    assert lines[3].startswith("lr=50.0: failed, skipped: loss diverged at epoch")
    assert lines[4].startswith("best: lr=0.1 ") and lines[4].endswith("1 of 3 failed")


def test_tyro_example_takes_every_launcher_field_as_a_flag(tmp_path: Path) -> None:
    help_text = run_example("tyro_cli.py", "--help", cwd=tmp_path)
    for flag in ("--hostnames", "--workers-per-host", "--backend", "--logs", "--env-vars", "--env-file", "--executor"):
        assert flag in help_text

    out = run_example(
        "tyro_cli.py", "--hostnames", "localhost", "--workers-per-host", "2", "--backend", "gloo", "--logs", "here",
        cwd=tmp_path,
    )  # fmt: skip
    assert "[localhost rank 0] Hello world! from rank 0 of 2" in out
    assert "rank 1 ran on" in out
    assert sorted(p.name.split("_", 1)[1] for p in (tmp_path / "here").iterdir()) == [
        "localhost.log",
        "localhost_0.log",
        "localhost_1.log",
    ]
    assert "Hello world! from rank 1 of 2" in next((tmp_path / "here").glob("*_localhost_1.log")).read_text()


@pytest.mark.multihost
def test_multihost_example_forms_one_process_group_over_two_ssh_hosts(multihost_bed: TestBed, tmp_path: Path) -> None:
    bed = multihost_bed
    out = run_example("multihost.py", "--ssh-config", str(bed.ssh_config), *bed.aliases, cwd=tmp_path)
    summary = [line for line in out.splitlines() if line.startswith("rank ")]
    assert summary == [
        "rank 0: host host1, all_reduce sum 10 (expected 10)",
        "rank 1: host host1, all_reduce sum 10 (expected 10)",
        "rank 2: host host2, all_reduce sum 10 (expected 10)",
        "rank 3: host host2, all_reduce sum 10 (expected 10)",
    ]
    assert "rank 3 (local rank 1) on host2" in next((tmp_path / "logs").glob("*_host2_1.log")).read_text()
    left = bed.wait_no_leftovers()
    assert not left, f"processes left on the hosts: {left}"
