"""Liveness and exposure under hostile conditions: strangers at the launcher's door, frozen or
killed processes at every phase, and what a local run exposes on the network."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from conftest import processes_with_tag, wait_until_gone

pytestmark = pytest.mark.timeout(120)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _agents(tag: str) -> list[int]:
    """The tagged agent processes (workers are forks of an agent: same command line, parent an agent)."""
    candidates = [p for p in processes_with_tag(tag) if "trx_core.agent" in _cmdline(p)]
    return [p for p in candidates if _parent(p) not in candidates]


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _wait_for(condition: Any, seconds: float = 60.0, step: float = 0.01) -> Any:
    end = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(step)
    return value


class RunInThread:
    def __init__(self, func: Any, **fields: Any) -> None:
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(func, fields), daemon=True)
        self.started = time.monotonic()
        self.thread.start()

    def _run(self, func: Any, fields: dict[str, Any]) -> None:
        try:
            self.outcome["result"] = dict(trx.launch(func, **fields))
        except BaseException as e:
            self.outcome["error"] = e
        self.outcome["seconds"] = time.monotonic() - self.started

    def join(self, seconds: float) -> dict[str, Any]:
        self.thread.join(seconds)
        assert not self.thread.is_alive(), "the run did not end"
        return self.outcome


def sleep_then_rank(seconds: float) -> int:
    time.sleep(seconds)
    return int(os.environ["RANK"])


def test_fifty_half_open_connections_do_not_delay_a_run(local: dict[str, Any], tag: str) -> None:
    run = RunInThread(sleep_then_rank, func_args=(4.0,), workers_per_host=2, heartbeat_timeout=3, **local)
    (agent,) = _wait_for(lambda: _agents(tag))
    argv = _cmdline(agent)
    port = int(argv[argv.index("--launcher") + 1].rpartition(":")[2])
    strangers = []
    for i in range(50):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            conn.sendall(b"x")  # one byte of an answer that never completes
        strangers.append(conn)
    try:
        outcome = run.join(60)
    finally:
        for conn in strangers:
            conn.close()
    assert outcome.get("result") == {0: 0, 1: 1}, outcome.get("error")
    # A blocking 2-s read per stranger would have frozen the loop for ~100 s (and the run died)
    assert outcome["seconds"] < 30


def _listening_sockets(pids: list[int]) -> list[str]:
    """``address:port`` of every listening TCP socket that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append(f"{_address(address, width)}:{int(port, 16)}")
    return found


def _address(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def test_a_local_run_listens_on_loopback_only(local: dict[str, Any], tag: str) -> None:
    run = RunInThread(sleep_then_rank, func_args=(3.0,), workers_per_host=2, **local)
    _wait_for(lambda: len(processes_with_tag(tag)) >= 3)  # an agent and its two workers
    time.sleep(1.0)  # the process group is up: the store, gloo's sockets
    sockets = _listening_sockets([os.getpid(), *processes_with_tag(tag)])
    outcome = run.join(60)
    assert outcome.get("result") == {0: 0, 1: 1}, outcome.get("error")
    assert len(sockets) >= 2  # the launcher's door and the rendezvous store, at least
    exposed = [s for s in sockets if not (s.startswith("127.") or s.startswith("::1:"))]
    assert not exposed, f"listening beyond loopback: {exposed} (all: {sockets})"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_an_agent_ended_by_a_signal_is_reported_naming_the_signal(
    local: dict[str, Any], tag: str, signum: signal.Signals
) -> None:
    run = RunInThread(sleep_then_rank, func_args=(60.0,), workers_per_host=2, **local)
    _wait_for(lambda: len(processes_with_tag(tag)) >= 3)
    (agent,) = _agents(tag)
    os.kill(agent, signum)
    outcome = run.join(60)
    error = outcome.get("error")
    assert isinstance(error, trx.AgentFailedError), error
    assert signum.name in str(error) and "exit code 0" not in str(error)


def test_an_agent_frozen_while_it_starts_fails_the_run_within_the_heartbeat_timeout(
    local: dict[str, Any], tag: str
) -> None:
    run = RunInThread(sleep_then_rank, func_args=(1.0,), heartbeat_timeout=3, **local)
    (agent,) = _wait_for(lambda: _agents(tag), step=0.002)
    time.sleep(0.3)  # connected and importing torch (or about to)
    os.kill(agent, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        outcome = run.join(60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the executor, most likely
            os.kill(agent, signal.SIGCONT)
    error = outcome.get("error")
    assert isinstance(error, trx.AgentFailedError), error
    assert time.monotonic() - frozen_at < 3 + 3 + 2  # heartbeat_timeout + 3 s, plus the stop itself


LAUNCHER_SCRIPT = """
import os, sys, threading, time
import torchrunx as trx

def sleep_long():
    time.sleep(120)

mode, state = sys.argv[1], sys.argv[2]

def fork_a_child():
    time.sleep(2.0)  # the agents are connected: the child inherits their sockets
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    with open(state + ".child", "w") as f:
        f.write(str(pid))

if mode == "fork":
    threading.Thread(target=fork_a_child, daemon=True).start()
try:
    trx.launch(sleep_long, hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=None,
               log_console=None, heartbeat_timeout=3)
except Exception as e:
    with open(state, "w") as f:
        f.write(f"{type(e).__name__}: {e}")
"""


def _start_launcher(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(LAUNCHER_SCRIPT))
    state = tmp_path / "state"
    process = subprocess.Popen([sys.executable, str(script), mode, str(state)], cwd=tmp_path)
    return process, state


def test_an_agent_whose_launcher_froze_says_so_when_it_resumes(tmp_path: Path, tag: str) -> None:
    launcher, state = _start_launcher(tmp_path, "plain")
    try:
        _wait_for(lambda: len(processes_with_tag(tag)) >= 4)  # launcher, agent, two workers
        time.sleep(0.5)
        os.kill(launcher.pid, signal.SIGSTOP)  # as Ctrl-Z, or a paused VM
        _wait_for(lambda: not _agents(tag), seconds=30, step=0.1)  # the agent gave up and left
        os.kill(launcher.pid, signal.SIGCONT)
        launcher.wait(60)
    finally:
        launcher.kill()
        launcher.wait()
    message = state.read_text()
    assert message.startswith("AgentFailedError") and "the launcher was silent" in message, message


def test_a_launcher_killed_while_a_forked_child_holds_its_sockets_leaves_nothing(tmp_path: Path, tag: str) -> None:
    launcher, state = _start_launcher(tmp_path, "fork")
    child_file = Path(str(state) + ".child")
    try:
        _wait_for(lambda: child_file.exists() and child_file.read_text())
        child = int(child_file.read_text())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        agents_left = wait_until_gone_except(tag, child, seconds=5)
        assert not agents_left, f"still alive 5 s after the launcher was killed: {agents_left}"
    finally:
        launcher.kill()
        if child_file.exists() and child_file.read_text():
            os.kill(int(child_file.read_text()), signal.SIGKILL)
    assert not wait_until_gone(tag)


def wait_until_gone_except(tag: str, keep: int, seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while (left := [p for p in processes_with_tag(tag) if p != keep]) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def say_running_then_sleep(folder: str, seconds: float) -> None:
    Path(folder, os.environ["RANK"]).touch()
    time.sleep(seconds)


def _destroy_tcp_sockets(*filter_and_prefix: str, netns: str | None = None) -> list[str]:
    """Destroy the TCP sockets that match an `ss` filter (in `netns`): their owner's next call on
    one fails (ECONNABORTED) and its peer gets a reset. The lines of the sockets destroyed."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run([*prefix, "ss", "-K", "-t", "-n", *filter_and_prefix], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines()[1:] if line.strip()]


def _can_destroy_sockets() -> bool:
    """Whether `ss -K` works here (root, and a kernel with CONFIG_INET_DIAG_DESTROY)."""
    if os.geteuid() != 0 or not shutil.which("ss"):
        return False
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            server.accept()[0].close()
            return bool(_destroy_tcp_sockets("dst", "127.0.0.1", "dport", "=", f":{port}"))


def _netns_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["local", pytest.param("ssh", marks=pytest.mark.multihost)])
def test_an_agent_whose_connection_is_reset_is_reported_as_a_lost_connection(
    local: dict[str, Any], tag: str, tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    if not _can_destroy_sockets():
        pytest.skip("ss -K cannot reset a connection here (needs root and CONFIG_INET_DIAG_DESTROY)")
    netns = None
    fields = dict(local, workers_per_host=2)
    if where == "ssh":
        bed = request.getfixturevalue("multihost_bed")
        fields.update(hostnames=bed.aliases, ssh_config_file=bed.ssh_config, timeout=60)
        netns = bed.hosts[1].netns  # the agent that does not host the rendezvous store
    running = tmp_path / "running"
    running.mkdir()
    run = RunInThread(say_running_then_sleep, func_args=(str(running), 60.0), **fields)
    _wait_for(lambda: len(list(running.iterdir())) == 2 * len(fields["hostnames"]))
    candidates = _agents(tag) if netns is None else [p for p in _agents(tag) if p in _netns_pids(netns)]
    argv = _cmdline(candidates[0])
    address, _, port = argv[argv.index("--launcher") + 1].rpartition(":")
    reset = _destroy_tcp_sockets("dst", address.strip("[]"), "dport", "=", f":{port}", netns=netns)
    reset_at = time.monotonic()
    assert len(reset) == 1, reset  # the agent's connection to the launcher, and nothing else
    outcome = run.join(60)
    error = outcome.get("error")
    assert isinstance(error, trx.AgentFailedError), error
    assert "connection to the launcher was lost" in str(error) and "exit code 0" not in str(error), str(error)
    assert time.monotonic() - reset_at < 15
    assert not wait_until_gone(tag, 5.0)
    if where == "ssh":
        assert not bed.wait_no_leftovers(5.0)
