"""Debugging from the launcher's terminal: ``breakpoint()`` in any rank opens pdb there, post-mortem
stops a failing rank where it raised, and every rank's stack can be printed while the run goes on.

The terminal tests run a launcher script (`SCRIPT`) in a real pseudo-terminal with pexpect, and
type into it as a user would. A prompt is labelled ``[HOST rank R local L] (Pdb)``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
import torch.distributed as dist

import torchrunx as trx
from conftest import processes_with_tag
from multihost import TestBed

WAIT_S = 60  # for each thing the terminal should show: start-up included, on a loaded machine

SCRIPT = r'''"""python launcher.py MODE LAUNCHER-FIELDS-JSON [ARG]: one launch, then print its outcome."""
import json, os, sys, time

import torch.distributed as dist
import torchrunx as trx


def breakpoint_on_rank_1(scale):
    rank = dist.get_rank()
    x = (rank + 1) * scale
    if rank == 1:
        breakpoint()
    y = x * 2
    dist.barrier()
    return y


def breakpoint_on_every_rank(scale):
    x = (dist.get_rank() + 1) * scale
    breakpoint()
    dist.barrier()
    return x


def torch_breakpoint_on_rank_1():
    secret = dist.get_rank() * 7
    dist.breakpoint(rank=1)  # rank 1 stops; the others wait for it in a barrier
    return secret


def rank_1_raises():
    table = {"a": 1}
    if dist.get_rank() == 1:
        return table["missing"]  # the raising line
    return table["a"]


def rank_1_waits_for_a_file_while_the_others_wait_in_a_barrier(flag):
    if dist.get_rank() == 1:
        while not os.path.exists(flag):
            time.sleep(0.05)
    dist.barrier()
    return dist.get_rank()


def in_a_session(fields):
    """Ctrl-C during the first run's pdb session; the session's next run stops at its breakpoint too."""
    with trx.Launcher(**fields) as launcher:
        try:
            launcher.run(breakpoint_on_rank_1, {"scale": 10})
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
        return launcher.run(breakpoint_on_rank_1, {"scale": 1})


mode, fields = sys.argv[1], json.loads(sys.argv[2])
args = {"flag": sys.argv[3]} if len(sys.argv) > 3 else ({"scale": 10} if mode.startswith("breakpoint") else {})
try:
    results = in_a_session(fields) if mode == "in_a_session" else trx.launch(globals()[mode], args, **fields)
    print("RESULTS", sorted(results.items()), flush=True)
except KeyError as e:
    print("RAISED", repr(e), flush=True)
'''


class Terminal:
    """A launcher script running in a pseudo-terminal."""

    def __init__(self, tmp_path: Path, mode: str, fields: dict[str, Any], *extra: str) -> None:
        script = tmp_path / "launcher.py"
        script.write_text(SCRIPT)
        self.child = pexpect.spawn(
            sys.executable,
            [str(script), mode, json.dumps(fields), *extra],
            cwd=str(tmp_path),
            env=dict(os.environ),
            encoding="utf-8",
            codec_errors="replace",
            timeout=WAIT_S,
            dimensions=(50, 250),
        )

    def expect(self, pattern: str) -> str:
        """Wait for `pattern` (a regular expression); what it matched."""
        self.child.expect(pattern)
        return str(self.child.after)

    def prompt(self, rank: int, host: str = "localhost") -> None:
        """Wait for the prompt of `rank`."""
        self.expect(rf"\[{host} rank {rank} local \d+\] \(Pdb\) ")

    def type(self, line: str) -> None:
        self.child.sendline(line)

    def stacks(self) -> str:
        """Press Ctrl-\\ and return what the terminal shows within the next 2 s."""
        self.child.sendcontrol("\\")
        self.expect("torchrunx: Python stacks")
        self.child.expect(pexpect.TIMEOUT, timeout=2)
        return str(self.child.before).replace("\r\n", "\n")

    def end(self) -> str:
        """Wait for the script to end; what it printed last."""
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert self.child.exitstatus == 0, self.child.before
        return str(self.child.before)

    def close(self) -> None:
        if self.child.isalive():
            self.child.close(force=True)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Any]:
    """Opens launcher scripts in terminals (`terminal(mode, fields, *args)`), and closes them."""
    opened: list[Terminal] = []

    def open_terminal(mode: str, fields: dict[str, Any], *extra: str) -> Terminal:
        opened.append(Terminal(tmp_path, mode, fields, *extra))
        return opened[-1]

    yield open_terminal
    for t in opened:
        t.close()


def on_this_machine(tmp_path: Path, **fields: Any) -> dict[str, Any]:
    return {
        "hostnames": ["localhost"],
        "workers_per_host": 2,
        "backend": "gloo",
        "logs": str(tmp_path / "logs"),
    } | fields


# --------------------------------------------------------------------------- breakpoint()
@pytest.mark.timeout(120)
def test_breakpoint_on_rank_1_opens_its_prompt_p_shows_a_local_and_c_finishes_the_run(
    terminal: Any, tmp_path: Path
) -> None:
    t = terminal("breakpoint_on_rank_1", on_this_machine(tmp_path))
    t.expect(r"\[localhost rank 1 local 1\] stopped: breakpoint\(\) at .*launcher.py:\d+ in breakpoint_on_rank_1")
    t.expect(r"-> y = x \* 2")  # pdb's own view: the line after breakpoint()
    t.prompt(1)
    t.type("p x")
    t.expect(r"\r\n20\r\n")
    t.prompt(1)
    t.type("c")
    assert "RESULTS [(0, 20), (1, 40)]" in t.end()


@pytest.mark.timeout(120)
def test_two_ranks_stopped_at_once_can_each_be_reached_and_all_continued(terminal: Any, tmp_path: Path) -> None:
    t = terminal("breakpoint_on_every_rank", on_this_machine(tmp_path))
    t.expect(r"stopped too: breakpoint\(\)")
    first = int(t.expect(r"\[localhost rank (\d) local \d\] \(Pdb\) ").split("rank ")[1][0])
    second = 1 - first
    t.type("p x")
    t.expect(rf"\r\n{(first + 1) * 10}\r\n")
    t.prompt(first)
    t.type(f"@{second}")
    t.expect(rf"now at \[localhost rank {second} local {second}\]")
    t.prompt(second)
    t.type("p x")
    t.expect(rf"\r\n{(second + 1) * 10}\r\n")
    t.prompt(second)
    t.type("@all p x + 1")  # one command for several ranks: each answer names its rank
    answers = {t.expect(r"\[rank \d\] \d+\r\n").strip() for _ in range(2)}
    assert answers == {"[rank 0] 11", "[rank 1] 21"}
    t.type("@all c")
    assert "RESULTS [(0, 10), (1, 20)]" in t.end()


@pytest.mark.timeout(120)
def test_torch_distributed_breakpoint_stops_its_rank_in_the_terminal(terminal: Any, tmp_path: Path) -> None:
    t = terminal("torch_breakpoint_on_rank_1", on_this_machine(tmp_path))
    t.expect(r"\[localhost rank 1 local 1\] stopped: torch.distributed.breakpoint\(\) at .*launcher.py:\d+")
    t.prompt(1)
    t.type("up")  # torch's breakpoint() stops in itself, before its barrier
    t.expect(r"-> dist.breakpoint\(rank=1\)")
    t.prompt(1)
    t.type("p secret")
    t.expect(r"\r\n7\r\n")
    t.prompt(1)
    t.type("c")
    assert "RESULTS [(0, 0), (1, 7)]" in t.end()


# --------------------------------------------------------------------------- post-mortem
@pytest.mark.timeout(120)
def test_post_mortem_stops_the_failing_rank_at_the_line_that_raised(terminal: Any, tmp_path: Path) -> None:
    t = terminal("rank_1_raises", on_this_machine(tmp_path, post_mortem=True))
    t.expect(r"\[localhost rank 1 local 1\] stopped: post-mortem of KeyError: 'missing' at .*launcher.py:\d+")
    t.expect(r'-> return table\["missing"\]  # the raising line')
    t.prompt(1)
    t.type("p table")
    t.expect(r"\{'a': 1\}")
    t.prompt(1)
    t.type("c")
    assert "RAISED KeyError('missing')" in t.end()  # then the exception comes back as always


def test_post_mortem_without_a_terminal_is_refused_before_anything_starts(local: dict[str, Any]) -> None:
    # pytest's standard input is not a terminal
    with pytest.raises(trx.ConfigurationError, match="post_mortem=True needs a terminal"):
        trx.launch(no_terminal_breakpoint, post_mortem=True, **local)


# --------------------------------------------------------------------------- stacks
@pytest.mark.timeout(120)
def test_ctrl_backslash_prints_the_line_each_rank_is_on_while_a_rank_waits_in_a_collective(
    terminal: Any, tmp_path: Path
) -> None:
    flag = tmp_path / "go"
    t = terminal(
        "rank_1_waits_for_a_file_while_the_others_wait_in_a_barrier",
        on_this_machine(tmp_path, workers_per_host=3),
        str(flag),
    )
    t.expect(r"started worker rank 2")
    stacks = ""
    for _ in range(30):  # until ranks 0 and 2 have reached the barrier
        stacks = t.stacks()
        if "--- ranks 0, 2 (localhost local 0, 2) ---" in stacks:
            break
    # identical stacks once, with their ranks; each names the user's line
    assert "--- ranks 0, 2 (localhost local 0, 2) ---" in stacks
    assert "in rank_1_waits_for_a_file_while_the_others_wait_in_a_barrier\n    dist.barrier()" in stacks
    assert "--- rank 1 (localhost local 1) ---\nThread MainThread:\n" in stacks
    assert "\n    time.sleep(0.05)" in stacks
    flag.touch()
    assert "RESULTS [(0, 0), (1, 1), (2, 2)]" in t.end()


def rank_1_waits_for_a_file_while_the_others_wait_in_a_barrier(flag: str) -> int:
    if dist.get_rank() == 1:
        while not os.path.exists(flag):
            time.sleep(0.05)
    dist.barrier()
    return dist.get_rank()


@pytest.mark.timeout(120)
def test_print_stacks_from_another_thread_groups_identical_stacks(local: dict[str, Any], tmp_path: Path) -> None:
    flag = tmp_path / "go"
    printed: list[str] = []

    def watchdog() -> None:
        try:
            for _ in range(300):
                out = io.StringIO()
                trx.print_stacks(file=out)
                if "--- ranks 0, 2 (localhost local 0, 2) ---" in out.getvalue():
                    printed.append(out.getvalue())
                    return
                time.sleep(0.1)
        finally:
            flag.touch()

    thread = threading.Thread(target=watchdog)
    thread.start()
    try:
        results = trx.launch(
            rank_1_waits_for_a_file_while_the_others_wait_in_a_barrier, {"flag": str(flag)}, workers_per_host=3, **local
        )
    finally:
        flag.touch()
        thread.join()
    assert dict(results) == {0: 0, 1: 1, 2: 2}
    (text,) = printed
    assert "in rank_1_waits_for_a_file_while_the_others_wait_in_a_barrier\n    dist.barrier()" in text
    assert "--- rank 1 (localhost local 1) ---" in text and "\n    time.sleep(0.05)" in text
    out = io.StringIO()
    trx.print_stacks(file=out)
    assert out.getvalue() == "torchrunx: no run in progress\n"


# --------------------------------------------------------------------------- no terminal, hangs, cleanup
def no_terminal_breakpoint() -> int:
    rank = dist.get_rank()
    if rank == 1:
        breakpoint()
    dist.breakpoint(rank=0)
    return rank


@pytest.mark.timeout(60)
def test_a_breakpoint_without_a_terminal_is_reported_and_skipped(
    local: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.monotonic()
    results = trx.launch(no_terminal_breakpoint, workers_per_host=2, **local)  # pytest's stdin is no terminal
    assert dict(results) == {0: 0, 1: 1}
    assert time.monotonic() - start < 30
    said = capsys.readouterr().err
    assert "[localhost rank 1 local 1] breakpoint() at " in said and "test_debugging.py:" in said
    assert "skipped: the launcher has no terminal" in said
    assert "[localhost rank 0 local 0] torch.distributed.breakpoint() at " in said
    log = next(Path(local["logs"]).glob("*_localhost_1.log")).read_text()
    assert "breakpoint() at " in log and "skipped: the launcher has no terminal" in log


@pytest.mark.timeout(120)
def test_a_rank_stopped_in_the_debugger_is_not_reported_hung_nor_are_its_peers(terminal: Any, tmp_path: Path) -> None:
    t = terminal("breakpoint_on_rank_1", on_this_machine(tmp_path, hang_timeout=1))
    t.prompt(1)
    time.sleep(4)  # rank 1 at the prompt, rank 0 in the barrier: both still, for 4x hang_timeout
    t.type("c")
    assert "RESULTS [(0, 20), (1, 40)]" in t.end()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_stopping_the_launcher_during_a_pdb_session_leaves_nothing_behind(
    terminal: Any, tmp_path: Path, tag: str, how: str
) -> None:
    t = terminal("breakpoint_on_rank_1", on_this_machine(tmp_path))
    t.prompt(1)
    assert len(processes_with_tag(tag)) >= 3  # the agent and both workers
    if how == "ctrl-c":
        t.child.sendintr()
        t.expect("KeyboardInterrupt")
        t.child.expect(pexpect.EOF)
    else:
        os.kill(t.child.pid, signal.SIGKILL)
    # the tag fixture checks that no process of the run outlives the test by 5 s


@pytest.mark.timeout(120)
def test_in_a_warm_session_ctrl_c_at_a_prompt_ends_that_run_and_the_next_run_can_be_debugged(
    terminal: Any, tmp_path: Path
) -> None:
    t = terminal("in_a_session", on_this_machine(tmp_path))
    t.prompt(1)
    t.child.sendintr()  # the run's workers are stopped, the session's agents kept
    t.expect("INTERRUPTED")
    t.prompt(1)
    t.type("p x")
    t.expect(r"\r\n2\r\n")
    t.prompt(1)
    t.type("c")
    assert "RESULTS [(0, 2), (1, 4)]" in t.end()


# --------------------------------------------------------------------------- two hosts over SSH
@pytest.mark.multihost
@pytest.mark.timeout(240)
def test_breakpoints_post_mortem_and_stacks_across_two_ssh_hosts(
    multihost_bed: TestBed, terminal: Any, tmp_path: Path
) -> None:
    fields = {
        "hostnames": multihost_bed.aliases,
        "workers_per_host": 1,  # rank 0 on host1, rank 1 on host2
        "ssh_config_file": str(multihost_bed.ssh_config),
        "backend": "gloo",
        "logs": str(tmp_path / "logs"),
        "timeout": 60,
    }
    # both ranks stopped, one on each host: each is reached, then both continue
    t = terminal("breakpoint_on_every_rank", fields)
    t.expect(r"stopped too: breakpoint\(\)")
    first = int(t.expect(r"\[host\d rank (\d) local 0\] \(Pdb\) ").split("rank ")[1][0])
    second = 1 - first
    t.type("p x")
    t.expect(rf"\r\n{(first + 1) * 10}\r\n")
    t.type(f"@{second}")
    t.prompt(second, host=f"host{second + 1}")
    t.type("p x")
    t.expect(rf"\r\n{(second + 1) * 10}\r\n")
    t.prompt(second, host=f"host{second + 1}")
    t.type("@all c")
    assert "RESULTS [(0, 10), (1, 20)]" in t.end()

    # post-mortem on host2
    t = terminal("rank_1_raises", fields | {"post_mortem": True})
    t.expect(r'-> return table\["missing"\]  # the raising line')
    t.prompt(1, host="host2")
    t.type("p table")
    t.expect(r"\{'a': 1\}")
    t.prompt(1, host="host2")
    t.type("c")
    assert "RAISED KeyError('missing')" in t.end()

    # stacks of both hosts while rank 0 (host1) waits in the barrier for rank 1 (host2)
    flag = tmp_path / "go"  # the hosts share the file system
    t = terminal("rank_1_waits_for_a_file_while_the_others_wait_in_a_barrier", fields, str(flag))
    t.expect(r"started worker rank 0")
    stacks = ""
    for _ in range(30):  # until rank 0 is seen on its own in the barrier (rank 1 still waiting for the file)
        stacks = t.stacks()
        if "--- rank 0 (host1 local 0) ---" in stacks and "dist.barrier()" in stacks:
            break
    assert "--- rank 0 (host1 local 0) ---" in stacks and "    dist.barrier()" in stacks
    assert "    time.sleep(0.05)" in stacks
    flag.touch()
    assert "RESULTS [(0, 0), (1, 1)]" in t.end()
    left = multihost_bed.wait_no_leftovers()
    assert not left, f"processes left on the hosts after the test: {left}"
