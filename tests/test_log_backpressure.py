"""Logs under hostile conditions (issue 11): a paused console or a stalled sink never stops a run
nor costs a line of the log files, and the files are private to the user."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import stat
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pexpect
import pytest

import torchrunx as trx
from conftest import heavy
from trx_core import ConsolePipeline, RunInfo
from trx_logging import LogLayout, add_sink

STEM = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}"
RECORD = re.compile(rf"^{STEM} ")  # the first line of a record in a .log file
LINE = re.compile(r"rank (\d) line (\d{7}) x+$")


def chatter(stop: str) -> int:
    """Print numbered 100-byte lines, about 300 a second, until `stop` exists; return how many."""
    rank = os.environ["RANK"]
    count = 0
    while not os.path.exists(stop):
        for _ in range(30):
            head = f"rank {rank} line {count:07d} "
            print(head + "x" * (99 - len(head)))
            count += 1
        sys.stdout.flush()
        time.sleep(0.1)
    return count


def log_files(folder: Path) -> dict[str, Path]:
    """The files of the single run in `folder` by role: ``agent``, ``0``, ``1``."""
    roles = {}
    for path in folder.iterdir():
        m = re.fullmatch(rf"{STEM}_localhost(?:_(\d))?\.log", path.name)
        assert m, path.name
        roles[m[1] or "agent"] = path
    assert set(roles) == {"agent", "0", "1"}, roles
    return roles


def numbers(path: Path, rank: int) -> list[int]:
    """The numbers of rank `rank`'s chatter lines in a log file, in file order."""
    return [int(m[2]) for line in path.read_text().splitlines() if (m := LINE.search(line)) and int(m[1]) == rank]


def records(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if RECORD.match(line))


def assert_files_hold_every_line(folder: Path, counts: dict[int, int]) -> dict[str, Path]:
    files = log_files(folder)
    for rank in (0, 1):
        assert numbers(files[str(rank)], rank) == list(range(counts[rank])), f"rank {rank}'s file lost lines"
    assert numbers(files["agent"], 0) == list(range(counts[0]))
    return files


LAUNCH_SCRIPT = """\
    import sys

    import torchrunx as trx
    from test_log_backpressure import chatter

    if __name__ == "__main__":
        results = trx.launch(
            chatter, {"stop": sys.argv[2]}, hostnames=["localhost"], workers_per_host=2, backend=None, logs=sys.argv[1]
        )
        print("RESULT", dict(results), flush=True)
"""


@heavy
@pytest.mark.timeout(300)
def test_a_console_paused_for_60_s_does_not_fail_the_run_or_lose_file_lines(tmp_path: Path) -> None:
    # A real terminal: the launcher's stdout is a pty, paused with Ctrl-S (XOFF) and not read
    # either, for 4x the default heartbeat_timeout, while the workers print 300 lines/s each.
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(LAUNCH_SCRIPT))
    logs, stop = tmp_path / "logs", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    child = pexpect.spawn(sys.executable, [str(script), str(logs), str(stop)], env=env, encoding="utf-8", timeout=120)
    try:
        assert termios.tcgetattr(child.child_fd)[0] & termios.IXON, "Ctrl-S would not pause this terminal"
        child.expect_exact("[localhost rank 0] rank 0 line 0000000")
        shown = child.before + child.after
        child.sendcontrol("s")
        time.sleep(60)
        child.sendcontrol("q")
        # The console catches up while the workers still print: the lines it could not hold
        # are replaced by a note, then new lines flow again.
        child.expect(r"\[torchrunx\] \d+ lines not shown: the console did not keep up; the log files have every line")
        shown += child.before + child.after
        stop.touch()
        child.expect(r"RESULT (\{.*\})\r\n")
        counts = ast.literal_eval(child.match[1])
        shown += child.before
        child.expect(pexpect.EOF)
        shown += child.before
    finally:
        stop.touch()
        child.close(force=True)
    assert child.exitstatus == 0, shown[-3000:]
    assert counts[0] > 60 * 100 and counts[1] > 60 * 100, counts  # they printed all along
    files = assert_files_hold_every_line(logs, counts)

    # What the console showed, plus the lines the notes say were not, is the agent's file.
    console = [line for line in shown.splitlines() if line.startswith("[localhost ")]
    not_shown = [int(n) for n in re.findall(r"\[torchrunx\] (\d+) lines not shown", shown)]
    assert len(not_shown) >= 1 and sum(not_shown) > 0
    assert len(console) + sum(not_shown) == records(files["agent"])
    shown_numbers = [int(m[2]) for line in console if (m := LINE.search(line))]
    assert shown_numbers == sorted(shown_numbers) and len(set(shown_numbers)) == len(shown_numbers)


@heavy
@pytest.mark.timeout(200)
def test_a_sink_stalled_for_30_s_does_not_fail_the_run_or_lose_file_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stop = tmp_path / "stop"
    received: list[trx.LogRecord] = []

    def stalls_at_first(record: trx.LogRecord) -> None:
        if not received:
            time.sleep(30)  # meanwhile: twice the heartbeat timeout, 18000 records
            stop.touch()  # the workers stop; the sink catches up with what it was kept
        received.append(record)

    started = time.monotonic()
    with add_sink(stalls_at_first):
        results = trx.launch(
            chatter, {"stop": str(stop)}, hostnames=["localhost"], workers_per_host=2, backend=None,
            logs=tmp_path / "logs", log_console=None,
        )  # fmt: skip
    took = time.monotonic() - started
    counts = dict(results)
    assert took > 30
    files = assert_files_hold_every_line(tmp_path / "logs", counts)

    # Every record is either received by the sink, in order, or counted in the note on stderr.
    err = capsys.readouterr().err
    not_sent = [int(n) for n in re.findall(r"did not keep up: (\d+) records were not sent to it", err)]
    assert not_sent and sum(not_sent) > 0, err
    agent_only = records(files["agent"]) - numbers(files["agent"], 0).__len__()
    assert len(received) + sum(not_sent) == records(files["0"]) + records(files["1"]) + agent_only
    for rank in (0, 1):
        got = [int(m[2]) for r in received if r.rank == rank and (m := LINE.search(r.message))]
        assert got == sorted(got) and len(set(got)) == len(got)
    assert not [t for t in threading.enumerate() if t.name.startswith("torchrunx-sink")]


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(120)
def test_log_files_are_0600_in_0700_folders_whatever_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHRUNX_LOG_MODE", raising=False)
    logs = tmp_path / "new" / "logs"
    with umask(0):
        trx.launch(print, func_args=["hi"], hostnames=["localhost"], workers_per_host=1, backend=None, logs=logs)
    assert mode(logs) == mode(logs.parent) == 0o700
    assert [mode(p) for p in logs.iterdir()] == [0o600, 0o600]


@pytest.mark.timeout(120)
def test_torchrunx_log_mode_opens_the_files_and_an_existing_folder_keeps_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHRUNX_LOG_MODE", "0640")
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o775)
    existing.chmod(0o775)
    with umask(0o077):
        trx.launch(print, func_args=["hi"], hostnames=["localhost"], workers_per_host=1, backend=None,
                   logs=existing / "team")  # fmt: skip
    assert mode(existing) == 0o775
    assert mode(existing / "team") == 0o750
    assert [mode(p) for p in (existing / "team").iterdir()] == [0o640, 0o640]

    monkeypatch.setenv("TORCHRUNX_LOG_MODE", "0444")
    with pytest.raises(trx.ConfigurationError, match="TORCHRUNX_LOG_MODE='0444'"):
        trx.launch(print, hostnames=["localhost"], workers_per_host=1, backend=None, logs=tmp_path / "x")


# --- close() is bounded even when the console never reads again --------------------------------


def flood_records(count: int) -> Iterator[trx.LogRecord]:
    for i in range(count):
        yield trx.LogRecord(time.time(), "node1", 0, 0, "stdout", 20, f"line {i:06d} " + "y" * 90)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pipeline", ["LogLayout", "ConsolePipeline"])
def test_close_returns_within_seconds_when_the_console_is_stuck_and_the_note_follows(
    tmp_path: Path, pipeline: str
) -> None:
    read_end, write_end = os.pipe()  # a console nobody reads: its writes block once 64 KiB wait
    layout = (
        LogLayout(tmp_path / "logs", console="stdout") if pipeline == "LogLayout" else ConsolePipeline(console="stdout")
    )
    layout.open(RunInfo(datetime.now(), ["node1"], [1]))
    with open(write_end, "w") as console, contextlib.redirect_stdout(console):
        started = time.monotonic()
        for record in flood_records(100_000):  # 20 MB: far more than the pipe and the queue hold
            layout.emit(record)
        emitted = time.monotonic() - started
        started = time.monotonic()
        layout.close()
        closed = time.monotonic() - started
        (writer,) = [t for t in threading.enumerate() if t.name == "torchrunx-console"]
        assert writer.daemon and writer.is_alive()  # still in its write: the one allowed to outlive close()

        # Reading unblocks it: it writes its note and ends.
        os.set_blocking(read_end, False)
        shown = bytearray()
        while writer.is_alive():
            with contextlib.suppress(BlockingIOError):
                shown += os.read(read_end, 1 << 20)
            writer.join(0.01)
    os.set_blocking(read_end, True)
    while chunk := os.read(read_end, 1 << 20):
        shown += chunk
    assert closed < 2.0 + 3.0, closed  # the 2 s wait for the console, and slack for a loaded machine
    assert emitted < 30, emitted  # never blocked: a stuck console only costs a queue append
    lines = shown.decode().splitlines()
    assert re.fullmatch(r"\[torchrunx\] \d+ lines not shown: the console did not keep up.*", lines[-1])
    not_shown = sum(int(n) for n in re.findall(r"\[torchrunx\] (\d+) lines not shown", shown.decode()))
    shown_numbers = [int(m[1]) for line in lines if (m := re.search(r"line (\d{6}) y", line))]
    assert len(shown_numbers) + not_shown == 100_000
    if pipeline == "LogLayout":
        (file,) = [p for p in (tmp_path / "logs").iterdir() if p.name.endswith("_node1_0.log")]
        assert sum(1 for _ in file.open()) == 100_000  # the file has every line
