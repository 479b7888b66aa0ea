"""Cleanup without gaps: every process of a run carries its agent's mark, so nothing survives
an agent that is SIGKILLed (the OOM killer) or frozen, even a worker's child that moved to a
session of its own; and a launcher SIGKILLed while a host's env_file still runs (no agent yet
to notice) takes everything with it, on this machine and over SSH. The autouse `tag` fixture
fails a test whose processes outlive it by 5 s."""

from __future__ import annotations

import os
import signal
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


def children_everywhere(folder: str) -> None:
    """Each worker starts a child in a session of its own and a plain one, then waits."""
    subprocess.Popen(["sleep", "300"], start_new_session=True)
    subprocess.Popen(["sleep", "300"])
    Path(folder, os.environ["RANK"]).write_text(str(os.getppid()))  # the agent forked us
    time.sleep(300)


def agent_pid_once_ready(folder: Path, ranks: int, deadline_s: float = 60) -> int:
    deadline = time.monotonic() + deadline_s
    while len(list(folder.iterdir())) < ranks:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    return int((folder / "0").read_text())


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_an_agent_killed_or_frozen_leaves_no_process_not_even_children_in_new_sessions(
    local: dict[str, Any], tmp_path: Path, tag: str, how: signal.Signals
) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            trx.launch(children_everywhere, {"folder": str(ready)}, workers_per_host=2, heartbeat_timeout=3, **local)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    agent = agent_pid_once_ready(ready, 2)
    # agent, 2 workers, 4 children: the grandchildren are in sessions other than the agent's
    assert len([p for p in processes_with_tag(tag) if p != os.getpid()]) >= 7
    os.kill(agent, how)
    thread.join(30)
    assert isinstance(outcome.get("error"), trx.AgentFailedError)
    assert not wait_until_gone(tag, 5.0)


LAUNCHER = textwrap.dedent(
    """
    import sys
    import torchrunx as trx

    if __name__ == "__main__":
        trx.launch(print, hostnames=sys.argv[1].split(","), ssh_config_file=sys.argv[2] or None,
                   env_file=sys.argv[3], backend=None, logs=None, timeout=120)
    """
)


def launcher_killed_while_env_files_run(tmp_path: Path, tag: str, hostnames: list[str], ssh_config: str) -> None:
    """Start a launcher whose hosts' env_file runs 40 s; SIGKILL it once every env_file runs."""
    started = tmp_path / "started"
    started.mkdir()
    env_file = tmp_path / "env.sh"
    env_file.write_text(f'touch "{started}/$(hostname)-$$"\nsleep 40\n')
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    launcher = subprocess.Popen([sys.executable, str(script), ",".join(hostnames), ssh_config, str(env_file)])
    try:
        deadline = time.monotonic() + 30
        while len(list(started.iterdir())) < len(hostnames):
            assert launcher.poll() is None, "the launcher ended early"
            assert time.monotonic() < deadline, "the env_files did not start"
            time.sleep(0.05)
        time.sleep(0.3)  # the sleeps are running
    finally:
        launcher.kill()
        launcher.wait()
    left = wait_until_gone(tag, 5.0)
    assert not left, f"alive 5 s after the launcher was SIGKILLed during the env_files: {left}"


@pytest.mark.timeout(60)
def test_a_launcher_sigkilled_while_the_env_file_runs_leaves_nothing_on_this_machine(tmp_path: Path, tag: str) -> None:
    launcher_killed_while_env_files_run(tmp_path, tag, ["localhost"], "")


@pytest.mark.timeout(120)
def test_a_launcher_sigkilled_while_the_env_file_runs_leaves_nothing_on_ssh_hosts(
    multihost_bed: Any, tmp_path: Path, tag: str
) -> None:
    bed = multihost_bed
    launcher_killed_while_env_files_run(tmp_path, tag, bed.aliases, str(bed.ssh_config))
    assert not bed.wait_no_leftovers(timeout=5.0)


@pytest.mark.timeout(120)
def test_an_env_file_that_execs_over_ssh_fails_the_run_at_once(multihost_bed: Any, tmp_path: Path) -> None:
    bed = multihost_bed
    env_file = tmp_path / "env.sh"
    env_file.write_text("exec sleep 300\n")
    start = time.monotonic()
    with pytest.raises(trx.AgentFailedError, match=r"replaced the agent's shell with `sleep 300` \(exec\)"):
        trx.launch(print, hostnames=bed.aliases, ssh_config_file=bed.ssh_config, env_file=env_file, backend=None)
    assert time.monotonic() - start < 15
    assert not bed.wait_no_leftovers(timeout=5.0)
