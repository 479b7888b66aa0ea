"""The launcher's control channel: only the run's own agents get in, and nothing reaches pickle
before the peer has proven it holds the run's secret, which is on no command line."""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from conftest import processes_with_tag


def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return os.environ["RANK"]


class RunInThread:
    """A launch in a background thread whose workers wait until `release()`."""

    def __init__(self, local: dict[str, Any], tmp_path: Path) -> None:
        self.gate = tmp_path / "go"
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(local,))

    def _run(self, local: dict[str, Any]) -> None:
        try:
            self.outcome["results"] = dict(
                trx.launch(wait_for_file, {"path": str(self.gate)}, workers_per_host=2, **local)
            )
        except BaseException as e:
            self.outcome["error"] = e

    def release(self) -> dict[int, str]:
        self.gate.touch()
        self.thread.join(60)
        assert "error" not in self.outcome, self.outcome["error"]
        return self.outcome["results"]  # type: ignore[no-any-return]


@pytest.fixture
def running(local: dict[str, Any], tmp_path: Path, tag: str) -> Iterator[tuple[RunInThread, int]]:
    """A run in progress, and the port its launcher listens on for agents."""
    run = RunInThread(local, tmp_path)
    run.thread.start()
    deadline = time.monotonic() + 60
    while True:
        agents = [cmdline(p) for p in processes_with_tag(tag) if "trx_core.agent" in cmdline(p)]
        if agents:
            break
        assert time.monotonic() < deadline, "no agent started"
        time.sleep(0.05)
    argv = agents[0].split("\0")
    port = int(argv[argv.index("--launcher") + 1].rpartition(":")[2])
    try:
        yield run, port
    finally:
        run.gate.touch()
        run.thread.join(60)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


class Exploit:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def frame(obj: object) -> bytes:
    head = pickle.dumps(obj)
    return struct.pack("!QQ", len(head), 0) + head


@pytest.mark.parametrize("answer", ["wrong-hmac", "no-handshake"])
def test_a_client_without_the_secret_is_dropped_and_nothing_it_sends_is_unpickled(
    running: tuple[RunInThread, int], tmp_path: Path, answer: str
) -> None:
    run, port = running
    marker = tmp_path / "unpickled"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as intruder:
        payload = frame(("hello", Exploit(marker)))
        if answer == "wrong-hmac":
            assert len(intruder.recv(32)) == 32  # the launcher's challenge
            intruder.sendall(os.urandom(64) + payload)
        else:
            intruder.sendall(payload * 4)
        intruder.settimeout(10)
        received = b""
        try:
            while chunk := intruder.recv(4096):  # until the launcher closes the connection
                received += chunk
        except ConnectionResetError:
            pass  # closed with our unread bytes still in its buffer: dropped all the same
        assert len(received) <= 32  # at most the challenge: no proof, no frames
    assert not marker.exists()
    assert run.release() == {0: "0", 1: "1"}  # the run itself went on unharmed


def test_an_agent_holding_another_runs_secret_is_refused(running: tuple[RunInThread, int]) -> None:
    run, port = running
    stranger = subprocess.run(
        [sys.executable, "-m", "trx_core.agent", "--launcher", f"127.0.0.1:{port}", "--host-index", "0"],
        input=secrets.token_hex(32) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert stranger.returncode == 2
    assert "do not share this run's secret" in stranger.stderr
    assert run.release() == {0: "0", 1: "1"}


def test_the_runs_secret_is_in_no_command_line_or_environment(
    local: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trx_core.supervisor

    issued: list[bytes] = []
    real = trx_core.supervisor.secrets.token_bytes

    def recording_token_bytes(n: int) -> bytes:
        value = real(n)
        if n == 32:  # the run's secret (token_hex, for names, also comes through here)
            issued.append(value)
        return value

    monkeypatch.setattr(trx_core.supervisor.secrets, "token_bytes", recording_token_bytes)
    seen: list[bytes] = []

    def scan() -> None:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                for name in ("cmdline", "environ"):
                    with contextlib.suppress(OSError):
                        seen.append(Path(f"/proc/{entry}/{name}").read_bytes())

    run = RunInThread(local, tmp_path)
    run.thread.start()
    time.sleep(3)  # agent and workers are up by now
    scan()
    run.release()
    (secret,) = issued
    assert len(seen) > 10
    assert not any(secret.hex().encode() in blob or secret in blob for blob in seen)
