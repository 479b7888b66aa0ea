"""Logs: the files of a run, what they capture, the console, the JSON option, sinks, and that
nothing is lost or piled up in memory (section 5 of the spec)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from conftest import processes_with_tag
from trx_core import RunInfo
from trx_logging import LogLayout, add_sink

STEM = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}"
# A line of a .log file: time, host, who, stream or level, message.
TEXT_LINE = re.compile(
    rf"^(?P<time>{STEM}) (?P<host>\S+) (?P<who>agent|rank \d+ local \d+) +(?P<source>\S+) +(?P<message>.*)$"
)


def fast(tmp_path: Path, **fields: Any) -> dict[str, Any]:
    """Launcher fields for a run on this machine, with no process group (quicker to start)."""
    return {"hostnames": ["localhost"], "backend": None, "logs": tmp_path / "logs", **fields}


def run_files(folder: Path, suffix: str = ".log") -> dict[str, Path]:
    """The files of the single run in `folder`, by role: ``agent``, ``0``, ``1``..."""
    files = sorted(folder.iterdir())
    stems = {re.match(STEM, f.name)[0] for f in files}  # type: ignore[index]
    assert len(stems) == 1, files
    by_role = {}
    for f in files:
        m = re.fullmatch(rf"{STEM}_localhost(?:_(\d+))?{re.escape(suffix)}", f.name)
        assert m, f.name
        by_role[m[1] or "agent"] = f
    return by_role


def parsed(path: Path) -> list[dict[str, str]]:
    """The records of a .log file (a continuation line of a multi-line message is appended)."""
    records: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        m = TEXT_LINE.match(line)
        if m:
            records.append({k: v.rstrip() for k, v in m.groupdict().items()})
        else:
            records[-1]["message"] += "\n" + line
    return records


def messages(path: Path, source: str | None = None) -> list[str]:
    return [r["message"] for r in parsed(path) if source is None or r["source"] == source]


# --- files: names, contents, runs that start together ---------------------------------------


def say_hello() -> None:
    print(f"hello from rank {os.environ['RANK']}")


def test_a_run_writes_one_file_per_agent_and_one_per_worker_named_by_start_time_and_host(tmp_path: Path) -> None:
    before = datetime.now()
    trx.launch(say_hello, workers_per_host=2, **fast(tmp_path))
    after = datetime.now()
    files = run_files(tmp_path / "logs")
    assert set(files) == {"agent", "0", "1"}
    start = datetime.fromisoformat(files["agent"].name.split("_")[0])
    assert before <= start <= after

    assert messages(files["0"]) == ["hello from rank 0"]
    assert messages(files["1"]) == ["hello from rank 1"]
    agent = parsed(files["agent"])
    # the agent's own messages, and its local worker 0's output, not worker 1's
    assert [r["message"] for r in agent if r["who"] == "rank 0 local 0"] == ["hello from rank 0"]
    assert not [r for r in agent if r["who"] == "rank 1 local 1"]
    agent_says = [r["message"] for r in agent if r["who"] == "agent"]
    assert any(m.startswith("started worker rank 1") for m in agent_says)
    assert "worker rank 0 (local rank 0) ended: exit code 0" in agent_says
    assert {r["host"] for r in agent} == {"localhost"}


def test_file_names_sort_in_the_order_the_runs_started(tmp_path: Path) -> None:
    launcher = trx.Launcher(workers_per_host=1, **fast(tmp_path))
    launcher.run(print, func_args=["first"])
    launcher.run(print, func_args=["second"])
    worker_files = [f for f in sorted((tmp_path / "logs").iterdir()) if f.name.endswith("_0.log")]
    assert [messages(f) for f in worker_files] == [["first"], ["second"]]


def print_run_name(name: str) -> None:
    print(f"run {name} rank {os.environ['RANK']}")


def test_runs_started_in_the_same_second_never_share_a_file(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            trx.launch(print_run_name, {"name": name}, workers_per_host=2, log_console=None, **fast(tmp_path))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    files = sorted((tmp_path / "logs").iterdir())
    assert len(files) == 6  # 2 runs x (1 agent + 2 workers)
    stems = sorted({f.name.split("_")[0] for f in files})
    assert len(stems) == 2 and stems[0][:19] == stems[1][:19]  # the same second
    for stem in stems:
        own = [f for f in files if f.name.startswith(stem)]
        names = {m.split()[1] for f in own for m in messages(f, "stdout")}
        assert len(names) == 1  # each file holds exactly one run's output


def test_two_runs_with_the_very_same_start_time_claim_different_files(tmp_path: Path) -> None:
    # Two runs of the same microsecond (the case the threads above rarely hit): the second
    # takes the next free name and leaves the first run's files alone.
    start = datetime(2026, 1, 2, 3, 4, 5, 123456)
    record = trx.LogRecord(time.time(), "node1", 0, 0, "stdout", logging.INFO, "first run")
    first, second = LogLayout(tmp_path, console=None), LogLayout(tmp_path, console=None)
    first.open(RunInfo(start, ["node1"], [1]))
    first.emit(record)
    second.open(RunInfo(start, ["node1"], [1]))
    second.emit(trx.LogRecord(time.time(), "node1", 0, 0, "stdout", logging.INFO, "second run"))
    first.close()
    second.close()
    assert not set(first.paths) & set(second.paths)
    stems = [{p.name.split("_")[0] for p in layout.paths} for layout in (first, second)]
    assert stems == [{"2026-01-02T03:04:05.123456"}, {"2026-01-02T03:04:05.123457"}]
    for layout, text in ((first, "first run"), (second, "second run")):
        assert all(messages(p) == [text] for p in layout.paths)


def test_logs_none_writes_no_file_and_still_shows_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    trx.launch(say_hello, workers_per_host=1, **fast(tmp_path, logs=None))
    assert list(tmp_path.iterdir()) == []
    assert "[localhost rank 0] hello from rank 0" in capsys.readouterr().out


@pytest.mark.parametrize("from_env", [True, False])
def test_default_folder_is_torchrunx_log_dir_else_torchrunx_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_env: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    if from_env:
        monkeypatch.setenv("TORCHRUNX_LOG_DIR", str(tmp_path / "from_env"))
    else:
        monkeypatch.delenv("TORCHRUNX_LOG_DIR", raising=False)
    trx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None).run(say_hello)
    folder = tmp_path / ("from_env" if from_env else "torchrunx_logs")
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert messages(run_files(folder)["0"]) == ["hello from rank 0"]


def test_a_log_folder_that_cannot_be_created_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    with pytest.raises(trx.ConfigurationError, match="not a folder"):
        trx.launch(say_hello, **fast(tmp_path, logs=tmp_path / "a_file"))
    with pytest.raises(trx.ConfigurationError, match="cannot create the log folder"):
        trx.launch(say_hello, **fast(tmp_path, logs=tmp_path / "a_file" / "logs"))


# --- what is captured ------------------------------------------------------------------------


def write_every_way() -> None:
    print("print")
    print("sys.stderr", file=sys.stderr)
    os.write(1, b"os.write 1\n")
    os.write(2, b"os.write 2\n")
    libc = ctypes.CDLL(None)
    libc.printf(b"C printf\n")
    libc.fflush(None)
    subprocess.run(["sh", "-c", "echo subprocess stdout; echo subprocess stderr >&2"], check=True)
    # a grandchild of the worker, writing on its own after the worker's last write
    subprocess.run(["sh", "-c", "(sleep 0.2; echo grandchild) & wait"], check=True)


def test_output_is_captured_at_the_file_descriptor_level_with_its_stream(tmp_path: Path) -> None:
    trx.launch(write_every_way, workers_per_host=1, **fast(tmp_path))
    got = [(r["source"], r["message"]) for r in parsed(run_files(tmp_path / "logs")["0"])]
    assert sorted(got) == sorted(
        [
            ("stdout", "print"),
            ("stderr", "sys.stderr"),
            ("stdout", "os.write 1"),
            ("stderr", "os.write 2"),
            ("stdout", "C printf"),
            ("stdout", "subprocess stdout"),
            ("stderr", "subprocess stderr"),
            ("stdout", "grandchild"),
        ]
    )


def log_at_every_level() -> None:
    logger = logging.getLogger("trainer")
    logger.debug("debug record")
    logger.info("info record")
    logger.warning("warning record")
    logger.error("error record")
    print("plain output")


@pytest.mark.parametrize("level", [None, "DEBUG", "WARNING"])
def test_logging_records_keep_their_level_and_torchrunx_log_level_filters_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str | None
) -> None:
    if level is None:
        monkeypatch.delenv("TORCHRUNX_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TORCHRUNX_LOG_LEVEL", level)
    trx.launch(log_at_every_level, workers_per_host=1, **fast(tmp_path))
    files = run_files(tmp_path / "logs")
    got = [(r["source"], r["message"]) for r in parsed(files["0"])]
    expected = {
        "DEBUG": [("DEBUG", "trainer: debug record")],
        "INFO": [("INFO", "trainer: info record")],
        "WARNING": [("WARNING", "trainer: warning record")],
        "ERROR": [("ERROR", "trainer: error record")],
    }
    threshold = logging.getLevelName(level or "INFO")
    wanted = [r for name, records in expected.items() if logging.getLevelName(name) >= threshold for r in records]
    # Records and printed output travel apart (a socket and a pipe), so only each is in order.
    assert [r for r in got if r[0] != "stdout"] == wanted
    assert [r for r in got if r[0] == "stdout"] == [("stdout", "plain output")]
    agent_messages = [r for r in parsed(files["agent"]) if r["who"] == "agent"]
    assert bool(agent_messages) == (level != "WARNING")  # the agent's own messages are INFO


def warn() -> None:
    warnings.warn("learning rate is high", UserWarning, stacklevel=1)


def test_warnings_become_warning_records(tmp_path: Path) -> None:
    trx.launch(warn, workers_per_host=1, **fast(tmp_path))
    (record,) = parsed(run_files(tmp_path / "logs")["0"])
    assert record["source"] == "WARNING"
    assert "UserWarning: learning rate is high" in record["message"]


def draw_progress_bar() -> None:
    for percent in (0, 50, 100):
        sys.stderr.write(f"\rtraining: {percent:3d}%")
        sys.stderr.flush()
        time.sleep(0.01)
    sys.stderr.write("\n")
    sys.stdout.write("windows line\r\n")


def test_carriage_return_progress_bars_become_one_readable_line_per_state(tmp_path: Path) -> None:
    trx.launch(draw_progress_bar, workers_per_host=1, **fast(tmp_path))
    path = run_files(tmp_path / "logs")["0"]
    assert "\r" not in path.read_text()
    assert messages(path, "stderr") == ["training:   0%", "training:  50%", "training: 100%"]
    assert messages(path, "stdout") == ["windows line"]


class ShardMissing(Exception):
    pass


def raise_in_rank_1() -> None:
    if os.environ["RANK"] == "1":
        raise ShardMissing("shard 7 is missing")


def test_a_worker_exception_and_its_traceback_are_in_the_worker_file(tmp_path: Path) -> None:
    with pytest.raises(ShardMissing):
        trx.launch(raise_in_rank_1, workers_per_host=2, **fast(tmp_path))
    (record,) = parsed(run_files(tmp_path / "logs")["1"])
    assert record["source"] == "ERROR"
    assert record["message"].startswith("torchrunx: rank 1 raised:\nTraceback (most recent call last):")
    assert "in raise_in_rank_1" in record["message"]
    assert record["message"].endswith("ShardMissing: shard 7 is missing")


# --- nothing lost ----------------------------------------------------------------------------


def last_words_then_die(how: str) -> None:
    if os.environ["RANK"] != "0":
        time.sleep(60)  # killed by the agent when rank 0's death stops the run
    for i in range(2000):
        print(f"line {i}")
    if how == "SIGKILL":
        print("last words")
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdout.write("last words, no newline")
    os._exit(3)


@pytest.mark.parametrize("how", ["SIGKILL", "os._exit"])
def test_output_written_right_before_the_worker_dies_is_in_its_file_and_on_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    with pytest.raises(trx.WorkerFailedError, match="signal SIGKILL" if how == "SIGKILL" else "exit code 3"):
        trx.launch(last_words_then_die, {"how": how}, workers_per_host=2, **fast(tmp_path))
    files = run_files(tmp_path / "logs")
    last = "last words" if how == "SIGKILL" else "last words, no newline"
    expected = [*(f"line {i}" for i in range(2000)), last]
    assert messages(files["0"], "stdout") == expected
    assert messages(files["agent"], "stdout") == expected
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[localhost rank 0]")]
    assert [line.removeprefix("[localhost rank 0] ") for line in console] == expected


LINES = 20_000


def write_20000_lines() -> None:
    rank = os.environ["RANK"]
    for i in range(LINES):
        head = f"rank {rank} line {i:06d} "
        print(head + "x" * (99 - len(head)))  # 100 bytes with the newline


def numbered(lines: list[str], rank: int) -> list[int]:
    pattern = re.compile(rf"rank {rank} line (\d{{6}}) x+$")
    return [int(m[1]) for line in lines if (m := pattern.search(line))]


def test_2_workers_x_20000_lines_arrive_exactly_once_in_files_and_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trx.launch(write_20000_lines, workers_per_host=2, **fast(tmp_path))
    files = run_files(tmp_path / "logs")
    everything = list(range(LINES))
    for rank in (0, 1):
        assert numbered(files[str(rank)].read_text().splitlines(), rank) == everything
    agent_lines = files["agent"].read_text().splitlines()
    assert numbered(agent_lines, 0) == everything and numbered(agent_lines, 1) == []
    stdout = capsys.readouterr().out.splitlines()
    assert numbered(stdout, 0) == everything and numbered(stdout, 1) == []


def flood(seconds: float) -> int:
    """Write 4 KiB lines to stdout as fast as possible for `seconds`; return how many."""
    block = ("z" * 4095 + "\n").encode() * 16
    written = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.write(1, block)
        written += 16
    return written


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_flood_of_output_slows_the_worker_down_instead_of_filling_memory(
    tmp_path: Path, tag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The worker can write far faster than the launcher renders and writes records, so
    # without backpressure the agent's or the launcher's memory would grow by hundreds of MB.
    # Here ~500 MiB in 6 s. Measured once by hand for 30 s (3.1 GB of 4 KiB lines through
    # files and console): launcher RSS peaked at 26 MB, the agent's at 273 MB (torch itself).
    bound_mib, seconds = 64, 6.0
    received = [0]
    peaks = {"launcher": 0.0, "agent": 0.0}
    baselines: dict[str, float] = {"launcher": rss_mib(os.getpid())}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peaks["launcher"] = max(peaks["launcher"], rss_mib(os.getpid()))
            for pid in processes_with_tag(tag):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"trx_core.agent" in f.read() and received[0]:  # the agent has imported torch
                        rss = rss_mib(pid)
                        baselines.setdefault("agent", rss)
                        peaks["agent"] = max(peaks["agent"], rss)

    def count(record: trx.LogRecord) -> None:
        if record.stream == "stdout":
            received[0] += 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with add_sink(count), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            written = trx.launch(flood, {"seconds": seconds}, workers_per_host=1, **fast(tmp_path))[0]
    finally:
        done.set()
        sampler.join()
    files = run_files(tmp_path / "logs")
    with open(files["0"], "rb") as f:
        in_file = sum(chunk.count(b"zzzz\n") for chunk in iter(lambda: f.read(1 << 24), b""))
    for path in files.values():
        path.unlink()  # hundreds of MB
    assert in_file == written  # nothing dropped from the files
    # A sink that falls behind (a loaded machine) gets fewer records, and stderr says how many.
    not_sent = re.findall(r"did not keep up: (\d+) records were not sent to it", capsys.readouterr().err)
    assert received[0] + sum(map(int, not_sent)) == written
    flooded_mib = written * 4096 / 2**20
    assert flooded_mib > 2 * bound_mib, f"only {flooded_mib:.0f} MiB written: the test proves nothing"
    growth = {who: peaks[who] - baselines[who] for who in ("launcher", "agent")}
    assert growth["launcher"] < bound_mib and growth["agent"] < bound_mib, (growth, f"{flooded_mib:.0f} MiB")


# --- the console -----------------------------------------------------------------------------


def say_hello_and_log() -> None:
    say_hello()
    logging.getLogger("trainer").warning(f"careful, rank {os.environ['RANK']}")


def test_the_console_shows_agent_0_and_rank_0_as_it_happens_with_host_and_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trx.launch(say_hello_and_log, workers_per_host=2, **fast(tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert "[localhost rank 0] hello from rank 0" in out
    assert "[localhost rank 0] WARNING: careful, rank 0" in out
    assert any(line.startswith("[localhost agent] started worker rank 1") for line in out)
    assert not [line for line in out if "rank 1" in line and not line.startswith("[localhost agent]")]
    assert all(line.startswith(("[localhost rank 0] ", "[localhost agent] ")) for line in out)


def print_then_wait_for_a_file(path: str) -> None:
    print("before the wait", flush=True)
    while not os.path.exists(path):
        time.sleep(0.01)


def test_the_console_shows_output_while_the_worker_still_runs(tmp_path: Path) -> None:
    seen = threading.Event()
    go = tmp_path / "go"

    class Watch:
        def write(self, text: str) -> int:
            if "before the wait" in text:
                seen.set()
                go.touch()  # only now may the worker finish
            return len(text)

        def flush(self) -> None:
            pass

    with contextlib.redirect_stdout(Watch()):
        trx.launch(print_then_wait_for_a_file, {"path": str(go)}, workers_per_host=1, timeout=30, **fast(tmp_path))
    assert seen.is_set()


@pytest.mark.parametrize("console", ["stderr", None])
def test_the_console_can_be_moved_to_stderr_or_turned_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], console: str | None
) -> None:
    trx.launch(say_hello, workers_per_host=1, log_console=console, **fast(tmp_path))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert ("[localhost rank 0] hello from rank 0" in captured.err) == (console == "stderr")
    assert messages(run_files(tmp_path / "logs")["0"]) == ["hello from rank 0"]  # files unaffected


# --- for machines: JSON lines and sinks ------------------------------------------------------


def test_jsonl_format_writes_one_json_object_per_record(tmp_path: Path) -> None:
    trx.launch(say_hello_and_log, workers_per_host=2, log_format="jsonl", **fast(tmp_path))
    files = run_files(tmp_path / "logs", suffix=".jsonl")
    records = [json.loads(line) for line in files["1"].read_text().splitlines()]
    for r in records:
        datetime.fromisoformat(r.pop("time"))
    assert records == [
        {"host": "localhost", "rank": 1, "local_rank": 1, "stream": "stdout", "level": "info", "logger": ""}
        | {"message": "hello from rank 1"},
        {"host": "localhost", "rank": 1, "local_rank": 1, "stream": "logging", "level": "warning"}
        | {"logger": "trainer", "message": "careful, rank 1"},
    ]
    agent = [json.loads(line) for line in files["agent"].read_text().splitlines()]
    assert {(r["rank"], r["local_rank"]) for r in agent} == {(None, None), (0, 0)}


def test_user_sinks_receive_every_record_with_host_and_rank(tmp_path: Path) -> None:
    received: list[trx.LogRecord] = []
    handled: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handled.append(record)

    with add_sink(received.append), add_sink(Keep()):
        trx.launch(say_hello_and_log, workers_per_host=2, **fast(tmp_path))
    trx.launch(say_hello, workers_per_host=1, **fast(tmp_path))  # after removal: not received

    workers = {(r.hostname, r.rank, r.local_rank, r.stream, r.level, r.message) for r in received if r.rank is not None}
    assert workers == {
        ("localhost", rank, rank, stream, level, message)
        for rank in (0, 1)
        for stream, level, message in [
            ("stdout", logging.INFO, f"hello from rank {rank}"),
            ("logging", logging.WARNING, f"careful, rank {rank}"),
        ]
    }
    assert any(r.rank is None and r.message.startswith("started worker rank 1") for r in received)
    as_logging = {(h.hostname, h.rank, h.levelname, h.name, h.getMessage()) for h in handled}  # type: ignore[attr-defined]
    assert ("localhost", 1, "WARNING", "trainer", "careful, rank 1") in as_logging
    assert ("localhost", 0, "INFO", "torchrunx.worker", "hello from rank 0") in as_logging
    assert len(handled) == len(received)


def test_a_failing_sink_is_reported_and_the_run_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(record: trx.LogRecord) -> None:
        raise RuntimeError("metrics server is down")

    with add_sink(broken):
        results = trx.launch(os.getpid, workers_per_host=2, **fast(tmp_path))
    assert len(results) == 2
    err = capsys.readouterr().err
    assert err.count("RuntimeError: metrics server is down") == 1  # once, though every record failed
