"""Hang detection: ranks that stop making progress are named, their stacks logged, the run stopped."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import torchrunx as trx


def rank1_waits_forever_while_rank0_waits_for_it_in_a_barrier() -> None:
    if dist.get_rank() == 1:
        threading.Event().wait()  # a deadlock outside any collective: no timeout will fire
    dist.barrier()


def test_stuck_ranks_are_named_their_stacks_logged_and_the_run_stopped(local: dict[str, Any]) -> None:
    launcher = trx.Launcher(workers_per_host=2, hang_timeout=2, timeout=600, **local)
    start = time.monotonic()
    with pytest.raises(trx.WorkerHungError) as info:
        launcher.run(rank1_waits_forever_while_rank0_waits_for_it_in_a_barrier)
    assert time.monotonic() - start < 15  # start-up + 2 s + reporting; the group timeout is 600 s
    error = info.value
    assert error.ranks == [0, 1]
    assert "in rank1_waits_forever_while_rank0_waits_for_it_in_a_barrier" in error.stalled[1][2]
    # where the user's code is stuck, not torch's or the standard library's insides
    assert "test_hangs.py" in error.stalled[0][2] and "test_hangs.py" in error.stalled[1][2]
    logs = Path(local["logs"])
    worker1 = next(logs.glob("*_localhost_1.log")).read_text()
    assert "Current thread" in worker1 or "Thread 0x" in worker1  # faulthandler's dump
    assert "rank1_waits_forever_while_rank0_waits_for_it_in_a_barrier" in worker1


def busy_but_progressing() -> int:
    end, steps = time.monotonic() + 3, 0
    while time.monotonic() < end:
        time.sleep(0.05)
        steps += 1
    return steps


def test_a_rank_that_keeps_executing_is_not_a_hang_even_past_the_bound(local: dict[str, Any]) -> None:
    results = trx.launch(busy_but_progressing, workers_per_host=2, hang_timeout=1, **local)
    assert all(steps > 10 for steps in results.values())


def test_hang_timeout_must_be_positive(local: dict[str, Any]) -> None:
    with pytest.raises(trx.ConfigurationError, match="hang_timeout must be a positive"):
        trx.launch(busy_but_progressing, hang_timeout=0, **local)
