"""Messages too large for the way they travel: a clear error in the user's code, or output cut
into records, and never a hang (a worker's messages to its agent are frames of a bounded size)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import torchrunx as trx
from trx_core.worker import MAX_LOG_MESSAGE_BYTES, LogMessageTooLargeError

pytestmark = pytest.mark.timeout(180)

MiB = 2**20


def quiet(local: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Launcher fields of `local`, without the console (the test reads the files)."""
    return {**local, "log_console": None, **fields}


def worker_log(logs: Path, local_rank: int) -> str:
    (path,) = logs.glob(f"*_{local_rank}.log")
    return path.read_text()


def agent_log(logs: Path) -> str:
    (path,) = [p for p in logs.glob("*.log") if not p.stem.rpartition("_")[2].isdigit()]
    return path.read_text()


# --------------------------------------------------------------------------- worker functions
def log_a_message_of(size: int) -> str:
    logging.getLogger("bigdata").warning("y" * size)
    return "returned"


def log_together(size: int) -> int:
    """Log a record of `size` characters while the agent is stopped: it finds them all waiting."""
    dist.barrier()
    if dist.get_rank() == 0:
        agent = os.getppid()
        os.kill(agent, signal.SIGSTOP)
        threading.Timer(2.0, os.kill, (agent, signal.SIGCONT)).start()
    dist.barrier()
    logging.getLogger("bigdata").warning(str(dist.get_rank()) * size)
    return dist.get_rank()


def print_a_line_without_newline(size: int) -> tuple[int, int]:
    """Print `size` characters with no newline; the agent's peak resident memory before and after."""
    before = _peak_rss(os.getppid())
    sys.stdout.write("z" * size)
    sys.stdout.flush()
    return before, _peak_rss(os.getppid())


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        (line,) = [line for line in f if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


def write_into_the_control_socket(frame: bytes) -> None:
    """Write `frame` into the worker's control socket as no torchrunx code would, then wait."""
    if int(os.environ["LOCAL_RANK"]) == 0:
        sockets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    sockets.append(int(fd))
        (control,) = sockets  # with backend=None, the only socket of a worker
        with socket.socket(fileno=os.dup(control)) as sock:
            sock.sendall(frame)
    time.sleep(120)


def raise_a_huge_error(size: int) -> None:
    raise ValueError("q" * size)


# --------------------------------------------------------------------------- logging records
def test_a_log_message_over_the_limit_fails_the_logging_call_with_a_clear_error(local: dict[str, Any]) -> None:
    size = 100 * MiB  # over the limit of a frame (64 MiB): this used to hang the run forever
    start = time.monotonic()
    with pytest.raises(LogMessageTooLargeError) as info:
        trx.launch(log_a_message_of, func_args=(size,), **quiet(local, workers_per_host=1, backend=None))
    assert time.monotonic() - start < 60
    error = info.value
    assert isinstance(error, ValueError)
    text = str(error)
    assert f"{size:,} bytes" in text and f"{MAX_LOG_MESSAGE_BYTES:,} bytes" in text, text
    assert "'bigdata'" in text and "write large data to a file" in text, text
    assert "log_a_message_of" in "".join(getattr(error, "__notes__", [])), "the traceback names the logging call"


def test_a_log_message_just_under_the_limit_reaches_the_log_file_whole(local: dict[str, Any]) -> None:
    size = MAX_LOG_MESSAGE_BYTES - 1024
    results = trx.launch(log_a_message_of, func_args=(size,), **quiet(local, workers_per_host=1, backend=None))
    assert results[0] == "returned"
    assert "y" * size in worker_log(local["logs"], 0)


def test_big_records_of_several_workers_at_once_are_sent_in_several_batches(local: dict[str, Any]) -> None:
    # Five records of 15 MiB wait for the agent together: one batch of them would be 75 MiB,
    # over the limit of a frame, and the agent would be lost.
    size = 15 * MiB
    results = trx.launch(log_together, func_args=(size,), **quiet(local, workers_per_host=5))
    assert dict(results) == {rank: rank for rank in range(5)}
    logs = local["logs"]
    text = agent_log(logs)  # local rank 0's records are in the agent's file too
    assert "0" * size in text
    for rank in range(1, 5):
        assert str(rank) * size in worker_log(logs, rank)


# --------------------------------------------------------------------------- printed output
def test_a_huge_line_printed_without_newline_is_cut_into_records_and_nothing_is_lost(local: dict[str, Any]) -> None:
    size = 100 * MiB
    results = trx.launch(
        print_a_line_without_newline, func_args=(size,), **quiet(local, workers_per_host=1, backend=None)
    )
    before, after = results[0]
    assert after - before < 32 * MiB, f"the agent's peak memory grew by {(after - before) / MiB:.0f} MiB"
    lines = [line for line in worker_log(local["logs"], 0).splitlines() if "z" in line]
    assert sum(line.count("z") for line in lines) == size  # every character, in order of the records
    assert len(lines) >= size // (64 * 1024) and max(len(line) for line in lines) < 64 * 1024 + 200


# --------------------------------------------------------------------------- the agent's guard
@pytest.mark.parametrize(
    "frame",
    [
        struct.pack("!QQ", 100 * MiB, 0) + bytes(MiB),  # announces a message larger than a frame may be
        struct.pack("!QQ", 16, 0) + b"not a pickle....",  # a message that does not unpickle
    ],
    ids=["oversize", "malformed"],
)
def test_a_worker_whose_message_is_oversize_or_malformed_is_killed_and_named(
    local: dict[str, Any], frame: bytes
) -> None:
    start = time.monotonic()
    with pytest.raises(trx.WorkerFailedError) as info:
        trx.launch(write_into_the_control_socket, func_args=(frame,), **quiet(local, workers_per_host=2, backend=None))
    assert time.monotonic() - start < 60  # rank 0 was killed (not waited for), then rank 1 stopped
    text = str(info.value)
    assert "rank 0" in text and "SIGKILL: the agent killed it because it sent a malformed or oversize" in text, text
    assert "killing worker rank 0 (local rank 0) because it sent a malformed" in agent_log(local["logs"])


def test_an_exception_with_a_message_larger_than_a_frame_is_reraised_whole_with_its_type(
    local: dict[str, Any],
) -> None:
    size = 70 * MiB
    with pytest.raises(ValueError) as info:
        trx.launch(raise_a_huge_error, func_args=(size,), **quiet(local, workers_per_host=1, backend=None))
    message = str(info.value)  # (compared by length and content: a failing assert would print it all)
    assert type(info.value) is ValueError and len(message) == size and set(message) == {"q"}
    assert "characters cut by torchrunx" in "".join(info.value.__notes__)  # the traceback attached is cut
