"""Failures in workers and agents reach the caller as the right exception, quickly."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import pytest
import torch.distributed as dist

import torchrunx as trx


class TrainingDiverged(Exception):
    pass


def rank1_raises_while_rank0_waits_in_a_barrier() -> None:
    if dist.get_rank() == 1:
        raise TrainingDiverged("loss is nan")
    dist.barrier()


def test_worker_exception_is_reraised_with_its_type_and_remote_traceback(local: dict[str, Any]) -> None:
    with pytest.raises(TrainingDiverged, match="loss is nan") as info:
        trx.launch(rank1_raises_while_rank0_waits_in_a_barrier, workers_per_host=2, **local)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "host 'localhost', rank 1 (local rank 1)" in notes
    assert "in rank1_raises_while_rank0_waits_in_a_barrier" in notes
    assert 'raise TrainingDiverged("loss is nan")' in notes  # the source line, from this file


def test_exception_with_peers_blocked_in_a_collective_does_not_wait_for_the_timeout(local: dict[str, Any]) -> None:
    launcher = trx.Launcher(workers_per_host=2, timeout=600, **local)
    start = time.monotonic()
    with pytest.raises(TrainingDiverged):
        launcher.run(rank1_raises_while_rank0_waits_in_a_barrier)
    assert time.monotonic() - start < 20  # start-up included; the process-group timeout is 600 s


def every_rank_raises() -> None:
    dist.barrier()  # all ranks raise within microseconds of each other
    raise ValueError(f"bad shard {dist.get_rank()}")


def test_several_failing_ranks_are_reported_in_one_error(local: dict[str, Any]) -> None:
    # the first to arrive is the error; the others are attached to it as notes
    with pytest.raises(ValueError, match="bad shard") as info:
        trx.launch(every_rank_raises, workers_per_host=2, **local)
    first = int(str(info.value).split()[-1])
    other = 1 - first
    assert any(f"rank {other} on 'localhost' raised ValueError: bad shard {other}" in n for n in info.value.__notes__)


def die(how: str) -> None:
    if dist.get_rank() == 1:
        if how == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "SIGSEGV":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif how == "os._exit":
            os._exit(7)
        elif how == "sys.exit":
            sys.exit(3)
    dist.barrier()


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("SIGKILL", "killed by signal SIGKILL"),
        ("SIGSEGV", "killed by signal SIGSEGV"),
        ("os._exit", "exit code 7"),
        ("sys.exit", "exit code 3"),
    ],
)
def test_worker_dying_without_an_exception_raises_worker_failed_error(
    local: dict[str, Any], how: str, expected: str
) -> None:
    with pytest.raises(trx.WorkerFailedError) as info:
        trx.launch(die, {"how": how}, workers_per_host=2, **local)
    error = info.value
    assert (error.hostname, error.local_rank, error.rank) == ("localhost", 1, 1)
    assert expected in str(error)


def kill_my_agent() -> None:
    if dist.get_rank() == 0:
        os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)


def test_agent_killed_raises_agent_failed_error(local: dict[str, Any]) -> None:
    start = time.monotonic()
    with pytest.raises(trx.AgentFailedError, match=r"localhost.*SIGKILL") as info:
        trx.launch(kill_my_agent, workers_per_host=2, **local)
    assert info.value.hostname == "localhost"
    assert time.monotonic() - start < 20


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise Unpicklable()


def test_an_exception_that_cannot_be_pickled_is_still_reported_with_its_text(local: dict[str, Any]) -> None:
    with pytest.raises(trx.WorkerError, match="Unpicklable: holds a lock") as info:
        trx.launch(raise_unpicklable, workers_per_host=1, **local)
    assert info.value.type_name == "Unpicklable"
    assert any("raise Unpicklable()" in n for n in info.value.__notes__)


def return_a_lock() -> object:
    return threading.Lock()


def test_a_return_value_that_cannot_be_pickled_names_the_rank_and_type(local: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="return value of rank 0 \\(of type lock\\) cannot be pickled"):
        trx.launch(return_a_lock, workers_per_host=1, **local)


def quick() -> int:
    return dist.get_rank()


def test_back_to_back_short_runs_never_trip_over_their_own_teardown(local: dict[str, Any]) -> None:
    # Workers that finish together close their pipes and sockets in one burst of events; a
    # handler must never act on a descriptor an earlier handler of the same burst closed.
    launcher = trx.Launcher(workers_per_host=4, **local)
    for _ in range(8):
        assert dict(launcher.run(quick)) == {0: 0, 1: 1, 2: 2, 3: 3}


def sleep_long() -> None:
    time.sleep(120)


def test_an_agent_that_stops_answering_is_declared_lost_within_the_heartbeat_timeout(
    local: dict[str, Any], tag: str
) -> None:
    from conftest import processes_with_tag

    launcher = trx.Launcher(workers_per_host=2, heartbeat_timeout=3, **local)
    result: dict[str, BaseException] = {}

    def run() -> None:
        try:
            launcher.run(sleep_long)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not (agents := [p for p in processes_with_tag(tag) if b"trx_core.agent" in _cmdline(p)]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.5)  # let it start its workers
    os.kill(agents[0], signal.SIGSTOP)  # alive, connected, and silent: as a host that froze
    stopped_at = time.monotonic()
    thread.join(30)
    assert isinstance(result.get("error"), trx.AgentFailedError)
    assert "stopped answering" in str(result["error"])
    assert 3 <= time.monotonic() - stopped_at < 8


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
