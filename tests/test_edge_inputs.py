"""Unusual inputs get a clear error before any process starts, or work: a launcher without
standard output, a log folder it cannot write, hosts whose log files would share a name, a
variable too large for any process environment, two names of this machine, an env_file that
`exec`s, a log disk that fills up, and workers writing terminal escape sequences."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from trx_core import ConsolePipeline, LogRecord, RunInfo
from trx_logging.files import RunFiles


def rank() -> int:
    return int(os.environ["RANK"])


def refused(match: str, **fields: Any) -> trx.ConfigurationError:
    """Launch, expect a ConfigurationError matching `match`, raised before any process started."""
    start = time.monotonic()
    with pytest.raises(trx.ConfigurationError, match=match) as info:
        trx.launch(rank, **fields)
    assert time.monotonic() - start < 5  # no agent was started and waited for
    return info.value


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at `path` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False, timeout=30)


# --------------------------------------------------------------------------- no standard output
NO_STDOUT = textwrap.dedent(
    """
    import os, sys
    import torchrunx as trx

    def hello():
        print("hello from rank", os.environ["RANK"])
        return int(os.environ["RANK"])

    if __name__ == "__main__":
        assert sys.stdout is None and sys.stderr is None
        results = trx.launch(hello, hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=sys.argv[1])
        with open(sys.argv[2], "w") as f:
            f.write(repr(dict(results)))
    """
)


@pytest.mark.timeout(60)
def test_a_launcher_without_stdout_and_stderr_runs_without_a_console(tmp_path: Path) -> None:
    script = tmp_path / "no_stdout.py"
    script.write_text(NO_STDOUT)
    out = tmp_path / "results"
    # `>&- 2>&-`: Python starts with sys.stdout and sys.stderr None, as under some service managers.
    command = f'exec "{sys.executable}" "{script}" "{tmp_path / "logs"}" "{out}" >&- 2>&-'
    done = subprocess.run(["bash", "-c", command], timeout=50)
    assert done.returncode == 0
    assert out.read_text() == "{0: 0, 1: 1}"
    (log,) = (tmp_path / "logs").glob("*_localhost_1.log")
    assert "hello from rank 1" in log.read_text()


def test_the_core_console_pipeline_writes_nothing_when_there_is_no_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", None)
    pipeline = ConsolePipeline()
    pipeline.open(RunInfo(datetime.now(), ["localhost"], [1]))
    pipeline.emit(LogRecord(time.time(), "localhost", 0, 0, "stdout", 20, "nowhere to go"))
    pipeline.close()


# --------------------------------------------------------------------------- log folder
def test_a_log_folder_on_a_read_only_filesystem_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "logs", "ro,size=64k") as logs:
        error = refused("cannot write into the log folder", hostnames=["localhost"], logs=logs)
        assert str(logs) in str(error) and "Read-only file system" in str(error)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its permissions")
def test_a_log_folder_without_write_permission_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o555)
    refused("cannot write into the log folder .*Permission denied", hostnames=["localhost"], logs=logs)


def test_hosts_whose_log_files_would_share_a_name_are_refused_naming_both(tmp_path: Path) -> None:
    error = refused("same log file", hostnames=["node", "node_0"], workers_per_host=2, logs=tmp_path)
    assert "'node' and 'node_0'" in str(error) and "node_0.log" in str(error)
    refused("'gpu' and 'gpu_3'", hostnames=["gpu", "gpu_3"], workers_per_host=[4, 1], logs=tmp_path)
    # with fewer workers than the suffix, or without log files, nothing collides
    assert not list(tmp_path.iterdir())


def test_the_log_layout_refuses_shared_names_once_every_count_is_known(tmp_path: Path) -> None:
    # Counts from "auto" or "gpu" are known only once the agents report; the layout checks then.
    with pytest.raises(trx.ConfigurationError, match="'gpu' and 'gpu_3' would write into the same log file"):
        RunFiles.claim(tmp_path, datetime.now(), ["gpu", "gpu_3"], [4, 1], ".log")
    assert not list(tmp_path.iterdir())
    RunFiles.claim(tmp_path, datetime.now(), ["gpu", "gpu_3"], [3, 1], ".log").close()


# --------------------------------------------------------------------------- environment
def test_a_variable_too_large_for_any_process_is_refused_naming_it_and_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCHRUNX_TEST_HUGE", "x" * 200_000)  # copied by the default pattern TORCH*
    error = refused("TORCHRUNX_TEST_HUGE", hostnames=["localhost"], logs=None)
    assert "195 KiB" in str(error) and "128 KiB (MAX_ARG_STRLEN)" in str(error)
    monkeypatch.delenv("TORCHRUNX_TEST_HUGE")
    refused("BLOB is 293 KiB", hostnames=["localhost"], logs=None, extra_env_vars={"BLOB": "y" * 300_000})


def test_a_large_variable_under_the_limit_reaches_the_workers(local: dict[str, Any]) -> None:
    value = "v" * 120_000

    def length() -> int:
        return len(os.environ["BIG_BUT_FINE"])

    assert trx.launch(length, extra_env_vars={"BIG_BUT_FINE": value}, **local)[0] == 120_000


# --------------------------------------------------------------------------- hosts
@pytest.mark.parametrize("names", [["127.0.0.1", "localhost"], [socket.gethostname(), "localhost"]])
def test_two_names_of_this_machine_are_refused_before_any_process_starts(names: list[str]) -> None:
    error = refused("both name this machine", hostnames=names, logs=None)
    assert f"{names[0]!r} and {names[1]!r}" in str(error) and "executor='local'" in str(error)


def test_the_local_executor_runs_one_agent_per_name_on_purpose() -> None:
    results = trx.launch(rank, hostnames=["a", "b"], executor="local", workers_per_host=1, backend=None, logs=None)
    assert results.placement == (("a", 0), ("b", 0))


def test_an_env_file_that_execs_fails_the_run_at_once_instead_of_waiting_for_the_timeout(
    local: dict[str, Any], tmp_path: Path
) -> None:
    env_file = tmp_path / "env.sh"
    env_file.write_text("export READY=1\nexec sleep 300\n")
    start = time.monotonic()
    with pytest.raises(trx.AgentFailedError) as info:
        trx.launch(rank, env_file=env_file, timeout=300, **local)
    message = str(info.value)
    assert time.monotonic() - start < 10, message
    assert f"env_file {env_file} on host" in message and "`sleep 300`" in message and "(exec)" in message


def test_an_env_file_that_execs_a_program_that_ends_fails_the_run_at_once(
    local: dict[str, Any], tmp_path: Path
) -> None:
    env_file = tmp_path / "env.sh"
    env_file.write_text("exec true\n")
    start = time.monotonic()
    with pytest.raises(trx.AgentFailedError):
        trx.launch(rank, env_file=env_file, timeout=300, **local)
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------- full log disk
def flood() -> None:
    for i in range(4000):
        print(f"line {i:05d} " + "x" * 90)
    time.sleep(60)  # the run is stopped when its log cannot be written


@pytest.mark.timeout(60)
def test_a_full_log_disk_stops_the_run_with_an_error_naming_the_file(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "logs", "size=64k") as logs:
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            trx.launch(flood, hostnames=["localhost"], backend="gloo", logs=logs, log_console=None)
        assert time.monotonic() - start < 30
        error = info.value
        assert error.errno == errno.ENOSPC and error.filename is not None
        assert Path(error.filename).parent == logs and Path(error.filename).name.endswith(".log")
        assert "cannot write the log file of the run" in str(error) and error.filename in str(error)


# --------------------------------------------------------------------------- escape sequences
ESCAPES = "title \x1b]0;pwned\x07 clear \x1b[2J bell \x07 clip \x1b]52;c;aGk=\x07 \x1b[31mred\x1b[0m end"


def write_escapes() -> None:
    print(ESCAPES)


def test_escape_sequences_are_neutralised_on_the_console_and_kept_in_the_files(
    local: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    trx.launch(write_escapes, **local)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "title" in line]
    assert line == (
        "[localhost rank 0] title \\x1b]0;pwned\\x07 clear \\x1b[2J bell \\x07 clip \\x1b]52;c;aGk=\\x07 "
        "\x1b[31mred\x1b[0m end\x1b[0m"  # colours are kept, and reset at the end of the line
    )
    (log,) = local["logs"].glob("*_localhost_0.log")
    assert ESCAPES in log.read_text()
