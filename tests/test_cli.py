"""The `torchrunx` command runs an unchanged torchrun-style script (tests/scripts/torchrun_script.py:
argparse, its own init_process_group(), spawned DataLoader workers over a Dataset class of its
own) on every worker, and exits with the script's exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from multihost import TestBed
from torchrunx.cli import UsageError, parse

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "torchrun_script.py"
TORCHRUNX = Path(sys.executable).parent / "torchrunx"  # the console script, installed with the package
SUM_OF_SQUARES = sum(i * i for i in range(8))  # what one rank loads with the script's defaults


def torchrunx(*args: str | Path, cwd: Path | None = None, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TORCHRUNX), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


# --------------------------------------------------------------------------- running scripts
@pytest.mark.timeout(180)
def test_an_unchanged_torchrun_script_runs_on_every_worker_and_sets_the_exit_code(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = torchrunx("--nproc_per_node", "2", "--standalone", "--logs", logs, SCRIPT, "--exit-code", "3")
    assert done.returncode == 3, done.stdout + done.stderr
    # rank 0's output on the console: its own flags, the spawned loader's data, the all-reduce
    assert (
        f"rank 0/2 local_rank 0 argv ['--exit-code', '3'] loaded {SUM_OF_SQUARES} all_reduce {2 * SUM_OF_SQUARES}"
        in done.stdout
    )
    assert "sys.exit(3): exit code 3" in done.stderr
    (rank1_log,) = logs.glob("*_1.log")
    assert f"rank 1/2 local_rank 1 argv ['--exit-code', '3'] loaded {SUM_OF_SQUARES}" in rank1_log.read_text()


@pytest.mark.timeout(180)
def test_python_dash_m_torchrunx_runs_a_module_and_exits_0(tmp_path: Path) -> None:
    ours = ["--workers-per-host", "2", "--logs", str(tmp_path / "logs")]
    done = subprocess.run(
        [sys.executable, "-m", "torchrunx", *ours, "-m", "torchrun_script", "--items", "4"],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=SCRIPTS,  # as with `python -m`, the module is found in the current folder
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0/2 local_rank 0 argv ['--items', '4'] loaded 14 all_reduce 28" in done.stdout


@pytest.mark.timeout(180)
def test_a_worker_exception_exits_1_with_the_error_and_where_it_was_raised(tmp_path: Path) -> None:
    done = torchrunx(
        "--workers-per-host", "2", "--logs", tmp_path / "logs", SCRIPT, "--raise-on-rank", "1", "--loader-workers", "0"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ValueError: rank 1 was asked to raise" in done.stderr
    assert "torchrun_script.py" in done.stderr  # the worker's traceback


@pytest.mark.multihost
@pytest.mark.timeout(240)
def test_the_command_runs_a_torchrun_script_across_two_ssh_hosts(multihost_bed: TestBed, tmp_path: Path) -> None:
    bed = multihost_bed
    try:
        done = torchrunx(
            *("--hostnames", *bed.aliases, "--ssh-config-file", bed.ssh_config, "--nproc-per-node", "2"),
            *("--nnodes", "2", "--timeout", "60", "--logs", tmp_path / "logs"),
            *(SCRIPT, "--exit-code", "5"),
            timeout=200,
        )
        assert done.returncode == 5, done.stdout + done.stderr
        assert f"rank 0/4 local_rank 0 argv ['--exit-code', '5'] loaded {SUM_OF_SQUARES}" in done.stdout
        assert f"all_reduce {4 * SUM_OF_SQUARES} hosts host1,host1,host2,host2" in done.stdout
    finally:
        left = bed.wait_no_leftovers()
    assert not left, f"processes left on the hosts after the test: {left}"


# --------------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    ("argv", "launcher_args", "target", "script_args", "module"),
    [
        (["--hostnames", "a", "b", "t.py", "--lr", "1"], ["--hostnames", "a", "b"], "t.py", ["--lr", "1"], False),
        (["--nproc_per_node=2", "--standalone", "t.py"], ["--workers-per-host", "2"], "t.py", [], False),
        (["--workers-per-host", "2", "1", "train"], ["--workers-per-host", "2", "1"], "train", [], False),
        (["--env-vars", "A*", "--", "run", "-x"], ["--env-vars", "A*"], "run", ["-x"], False),
        (["--workers-per-host", "two", "t.py"], ["--workers-per-host", "two"], "t.py", [], False),
        (["--extra-env-vars", "A", "1", "B", "2", "t.py"], ["--extra-env-vars", "A", "1", "B", "2"], "t.py", [], False),
        (["--nproc-per-node", "2", "-m", "pkg.train", "--x"], ["--workers-per-host", "2"], "pkg.train", ["--x"], True),
        (["t.py", "--hostnames", "x", "--", "-m"], [], "t.py", ["--hostnames", "x", "--", "-m"], False),
    ],
)
def test_launcher_flags_end_at_the_script_and_torchrun_spellings_are_translated(
    argv: list[str], launcher_args: list[str], target: str, script_args: list[str], module: bool
) -> None:
    command = parse(argv)
    assert command is not None
    assert (command.launcher_args, command.target, command.script_args, command.module) == (
        launcher_args,
        target,
        script_args,
        module,
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--master-addr=10.0.0.1", "t.py"], "--launcher-address"),
        (["--master_port", "29500", "t.py"], "MASTER_PORT"),
        (["--rdzv-endpoint", "h:1", "t.py"], "--launcher-address"),
        (["--node_rank", "1", "t.py"], "--hostnames node1 node2"),
        (["--nnodes", "1:4", "t.py"], "elastic ranges"),
        (["--max-restarts", "3", "t.py"], "does not restart"),
        (["--nproc-per-node", "2"], "no script given"),
    ],
)
def test_torchrun_flags_without_an_equivalent_are_refused_saying_what_to_do(argv: list[str], says: str) -> None:
    with pytest.raises(UsageError, match=says):
        parse(argv)


def test_a_wrong_nnodes_or_a_missing_script_exits_2_before_anything_starts(tmp_path: Path) -> None:
    done = torchrunx("--nnodes", "2", "--nproc-per-node", "2", SCRIPT, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "--nnodes 2 but the hosts are 'auto' (1 host)" in done.stderr
    done = torchrunx("--master-addr", "10.0.0.1", SCRIPT, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "--master-addr is not supported" in done.stderr
    done = torchrunx(tmp_path / "missing.py", cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "can't open file" in done.stderr
    assert not (tmp_path / "torchrunx_logs").exists()


def test_help_shows_the_launcher_flags_the_script_forms_and_torchrun_spellings() -> None:
    done = torchrunx("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    for text in ("torchrunx [OPTIONS] script.py [SCRIPT ARGS]", "-m module", "--workers-per-host", "--nproc-per-node"):
        assert text in done.stdout
    backend_help = done.stdout.split("--backend", 1)[1].split("--logs", 1)[0]
    assert "(default: None)" in backend_help  # the script initialises its own process group
