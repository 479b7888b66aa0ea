"""The local executor leaves nothing behind, also when its agent is SIGKILLed and a worker's
child has left the agent's session: every process of a local agent carries the agent's mark
(`trx_remote.command.AGENT_MARK_VAR`) in its environment, and stopping the agent kills by
session and by mark. The autouse `tag` fixture fails the test if any process of it survives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torchrunx as trx
from trx_remote.command import AGENT_MARK_VAR

DETACHED_CHILD = "import os, sys, time; os.setsid(); print(os.getsid(0), flush=True); time.sleep(300)"


def agent_killed_after_a_child_left_its_session(pids: str) -> None:
    if int(os.environ["LOCAL_RANK"]) == 0:
        child = subprocess.Popen([sys.executable, "-c", DETACHED_CHILD], stdout=subprocess.PIPE)
        assert child.stdout is not None
        session = int(child.stdout.readline())  # the child is in a session of its own from here on
        agent = os.getppid()  # workers are forked by the agent
        assert session == child.pid != os.getsid(agent)
        Path(pids, "child").write_text(str(child.pid))
        Path(pids, "agent").write_text(str(agent))
        os.kill(agent, signal.SIGKILL)
    time.sleep(60)


@pytest.mark.timeout(60)
def test_killed_local_agent_fails_the_run_and_its_workers_child_outside_its_session_is_killed(
    tmp_path: Path, local: dict[str, object]
) -> None:
    start = time.monotonic()
    with pytest.raises(trx.AgentFailedError, match="SIGKILL"):
        trx.launch(agent_killed_after_a_child_left_its_session, {"pids": str(tmp_path)}, workers_per_host=2, **local)
    assert time.monotonic() - start < 30  # the peer sleeping 60 s is stopped, not waited for
    child = int((tmp_path / "child").read_text())
    assert not _alive(child), "the worker's child that called setsid survived its agent"


def print_agent_mark() -> str:
    return os.environ[AGENT_MARK_VAR]


@pytest.mark.timeout(60)
def test_every_local_agent_marks_its_workers_with_a_token_of_its_own(local: dict[str, object]) -> None:
    results = trx.launch(
        print_agent_mark, hostnames=["localhost", "127.0.0.1"], workers_per_host=2, backend=None, executor="local"
    )
    marks = [results[rank] for rank in range(4)]
    assert marks[0] == marks[1] != marks[2] == marks[3]
    assert all(len(mark) >= 16 for mark in marks)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
