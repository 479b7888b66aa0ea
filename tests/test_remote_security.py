"""No environment value on any command line: ``ps`` and ``/proc/*/cmdline`` are readable by
every user of a host, for as long as a process lives. A token in the launcher's environment
(``HF_TOKEN`` matches the default ``HF_*``) reaches every worker, yet no process of the run
shows it on any host: neither as the launcher sees it (polling while the run starts, works
and stops) nor as each worker sees it (with every agent and worker alive).

The SSH hosts of the test bed are network namespaces of this machine: they share its process
id namespace and its /proc, so one scan covers the launcher's machine and every host.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import torchrunx as trx
from multihost import TestBed


def command_lines_holding(value: str) -> list[str]:
    """``pid command line`` of every process whose command line holds `value`."""
    needle = value.encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if needle in cmdline:
                found.append(entry + " " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def what_the_worker_sees(token: str) -> dict[str, Any]:
    dist.barrier()  # every agent and worker of the run is alive
    found = command_lines_holding(token)
    agent = os.getppid()  # workers are forked by the agent
    dist.barrier()
    return {
        "token": os.environ.get("HF_TOKEN"),
        "command lines holding it": found,
        "agent": agent,
        "agent seen": any(line.startswith(f"{agent} ") for line in command_lines_holding("trx_core.agent")),
    }


class CommandLineWatch:
    """Polls every command line of this machine in a thread, from `__enter__` to `__exit__`."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.found: set[str] = set()
        self.agents_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cmdline-watch", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.found.update(command_lines_holding(self.value))
            self.agents_seen.update(int(line.split()[0]) for line in command_lines_holding("trx_core.agent"))

    def __enter__(self) -> CommandLineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    value = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", value)
    return value


@pytest.fixture
def bed(multihost_bed: TestBed) -> Iterator[TestBed]:
    yield multihost_bed
    left = multihost_bed.wait_no_leftovers()
    assert not left, f"processes left on the hosts after the test: {left}"


def launch_and_watch(token: str, **fields: Any) -> tuple[trx.LaunchResult, CommandLineWatch]:
    with CommandLineWatch(token) as watch:
        results = trx.launch(what_the_worker_sees, {"token": token}, **fields)
    return results, watch


@pytest.mark.timeout(120)
def test_no_command_line_holds_an_environment_value_on_local_agents(token: str, tmp_path: Path) -> None:
    results, watch = launch_and_watch(
        token, hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=tmp_path / "logs"
    )
    assert_sent_but_never_shown(token, [results[rank] for rank in range(2)], watch)


@pytest.mark.multihost
@pytest.mark.timeout(120)
def test_no_command_line_on_any_ssh_host_holds_an_environment_value(token: str, bed: TestBed, tmp_path: Path) -> None:
    fields = {"hostnames": bed.aliases, "workers_per_host": 1, "ssh_config_file": bed.ssh_config, "timeout": 60}
    results, watch = launch_and_watch(token, backend="gloo", logs=tmp_path / "logs", **fields)
    assert_sent_but_never_shown(token, [results[0], results[1]], watch)
    assert results[0]["agent"] != results[1]["agent"]  # one agent per host, both seen from here


def assert_sent_but_never_shown(token: str, seen_by_workers: list[dict[str, Any]], watch: CommandLineWatch) -> None:
    for seen in seen_by_workers:
        assert seen["token"] == token  # the worker has it
        assert seen["command lines holding it"] == []
        assert seen["agent seen"] and seen["agent"] in watch.agents_seen  # the scans do see the run
    assert watch.found == set()
