"""A worker ends as the Python program the user wrote would, and every way it ends reaches the
launcher faithfully: exit handlers, threads and open files complete; sys.exit keeps its code and
message; exceptions keep their type, attributes and chain; a KeyboardInterrupt in a worker is
not the launcher's own; a return value the launcher cannot load names its rank; a process the
function forked never speaks for its rank."""

from __future__ import annotations

import atexit
import gzip
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import torchrunx as trx

KEEP: list[object] = []  # in a worker: keeps files open until the worker's end


def log_text(logs: Path, suffix: str) -> str:
    """The text of the one log file of the run ending with `suffix` (e.g. ``_localhost_1.log``)."""
    (path,) = [p for p in logs.iterdir() if p.name.endswith(suffix)]
    return path.read_text()


# --------------------------------------------------------------------------- exit like Python
def leave_work_for_the_exit(folder: str) -> int:
    out = Path(folder, os.environ["RANK"])
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    buffered = open(out / "buffered.txt", "w")  # noqa: SIM115 - never closed, on purpose
    buffered.write("written, never flushed\n")
    compressed = gzip.open(out / "compressed.gz", "wt")  # noqa: SIM115 - its trailer is written at close
    compressed.write("gzip needs its close\n")
    KEEP.extend((buffered, compressed))

    def upload() -> None:
        time.sleep(1.0)  # still running when the function returns
        (out / "thread").write_text("done")

    threading.Thread(target=upload).start()  # non-daemon, as an async checkpoint upload
    return dist.get_rank()


@pytest.mark.timeout(60)
def test_atexit_handlers_buffered_files_and_non_daemon_threads_complete_in_a_worker(
    local: dict[str, Any], tmp_path: Path
) -> None:
    for rank in ("0", "1"):
        (tmp_path / rank).mkdir()
    results = trx.launch(leave_work_for_the_exit, {"folder": str(tmp_path)}, workers_per_host=2, **local)
    assert dict(results) == {0: 0, 1: 1}
    for rank in ("0", "1"):
        out = tmp_path / rank
        assert (out / "atexit").read_text() == "ran"
        assert (out / "buffered.txt").read_text() == "written, never flushed\n"
        assert gzip.decompress((out / "compressed.gz").read_bytes()) == b"gzip needs its close\n"
        assert (out / "thread").read_text() == "done"


def overstay() -> str:
    threading.Thread(target=time.sleep, args=(300,), name="stuck-uploader").start()
    atexit.register(time.sleep, 300)
    return "returned"


@pytest.mark.timeout(60)
def test_exit_steps_are_bounded_by_the_exit_grace_which_the_log_reports(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHRUNX_EXIT_GRACE", "1")  # reaches the workers through env_vars (TORCH*)
    start = time.monotonic()
    assert trx.launch(overstay, workers_per_host=1, **local)[0] == "returned"
    assert time.monotonic() - start < 20
    text = log_text(local["logs"], "_localhost_0.log")
    assert "non-daemon thread stuck-uploader still running 1 s after the function ended" in text
    assert "the atexit handlers still running 1 s after the function ended" in text


# --------------------------------------------------------------------------- sys.exit
def exit_with(code: object) -> None:
    if dist.get_rank() == 1:
        sys.exit(code)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [0, None])
def test_sys_exit_0_or_none_is_success_and_the_rank_returns_none(local: dict[str, Any], code: object) -> None:
    assert dict(trx.launch(exit_with, {"code": code}, workers_per_host=2, **local)) == {0: None, 1: None}


def test_sys_exit_with_a_message_reaches_the_error_and_the_workers_log(local: dict[str, Any]) -> None:
    with pytest.raises(trx.WorkerExitError) as info:
        trx.launch(exit_with, {"code": "fatal: config missing"}, workers_per_host=2, **local)
    error = info.value
    assert isinstance(error, trx.WorkerFailedError)
    assert (error.rank, error.local_rank, error.hostname) == (1, 1, "localhost")
    assert (error.code, error.how) == ("fatal: config missing", "exit code 1")
    assert "fatal: config missing" in str(error)
    text = log_text(local["logs"], "_localhost_1.log")
    assert "stderr   fatal: config missing" in text  # printed as Python prints it


def test_sys_exit_with_a_code_keeps_the_code(local: dict[str, Any]) -> None:
    with pytest.raises(trx.WorkerExitError, match=r"called sys.exit\(3\): exit code 3") as info:
        trx.launch(exit_with, {"code": 3}, workers_per_host=2, **local)
    assert info.value.code == 3
    assert any("exit_with" in note for note in info.value.__notes__)  # where sys.exit was called


# --------------------------------------------------------------------------- KeyboardInterrupt
def interrupted(how: str) -> None:
    if dist.get_rank() == 1:
        if how == "raise":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)  # as `kill -INT <worker>`
        time.sleep(30)
    dist.barrier()


@pytest.mark.parametrize("how", ["raise", "SIGINT"])
def test_a_keyboard_interrupt_in_a_worker_is_worker_interrupted_error_not_the_launchers_ctrl_c(
    local: dict[str, Any], how: str
) -> None:
    try:
        trx.launch(interrupted, {"how": how}, workers_per_host=2, **local)
    except KeyboardInterrupt:  # pragma: no cover - the failure this test is about
        pytest.fail("a worker's KeyboardInterrupt reached the launcher as its own Ctrl-C")
    except trx.WorkerInterruptedError as e:
        assert (e.rank, e.local_rank, e.hostname) == (1, 1, "localhost")
        assert any("KeyboardInterrupt" in note for note in e.__notes__)
    else:  # pragma: no cover
        pytest.fail("no error")


# --------------------------------------------------------------------------- exceptions
class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class ShardError(Exception):
    def __init__(self, shard: int, reason: str) -> None:
        super().__init__(f"shard {shard}: {reason}")
        self.shard = shard


class HoldsALock(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_(kind: str) -> None:
    if kind == "unprintable":
        raise UnprintableError("the message")
    if kind == "own __init__":
        raise ShardError(3, "checksum mismatch")
    if kind == "chain":
        try:
            {}["config"]
        except KeyError as e:
            raise ValueError("could not read the config") from e
    if kind == "implicit chain":
        try:
            print(1 / 0)
        except ZeroDivisionError:
            raise ShardError(1, "while handling")  # noqa: B904 - the implicit chain is the point
    if kind == "unpicklable cause":
        raise ValueError("outer") from HoldsALock()


def raised(kind: str, local: dict[str, Any]) -> BaseException:
    with pytest.raises(Exception) as info:
        trx.launch(raise_, {"kind": kind}, workers_per_host=1, **local)
    return info.value


def test_an_exception_whose_str_raises_keeps_its_type(local: dict[str, Any]) -> None:
    error = raised("unprintable", local)
    assert type(error) is UnprintableError and error.args == ("the message",)
    assert any("UnprintableError" in note for note in error.__notes__)


def test_an_exception_with_its_own_init_arguments_keeps_its_type_message_and_attributes(
    local: dict[str, Any],
) -> None:
    error = raised("own __init__", local)
    assert type(error) is ShardError
    assert str(error) == "shard 3: checksum mismatch" and error.shard == 3  # type: ignore[attr-defined]


def test_a_chain_of_exceptions_arrives_as_cause_and_context(local: dict[str, Any]) -> None:
    error = raised("chain", local)
    assert type(error) is ValueError and type(error.__cause__) is KeyError
    assert error.__cause__.args == ("config",)
    implicit = raised("implicit chain", local)
    assert type(implicit) is ShardError and type(implicit.__context__) is ZeroDivisionError


def test_an_exception_whose_cause_cannot_be_pickled_arrives_without_the_cause(local: dict[str, Any]) -> None:
    error = raised("unpicklable cause", local)
    assert type(error) is ValueError and str(error) == "outer" and error.__cause__ is None
    assert any("HoldsALock: holds a lock" in note for note in error.__notes__)  # in the remote traceback


ONLY_ON_WORKERS = textwrap.dedent(
    """
    class OnlyHereError(Exception):
        pass

    class OnlyHere:
        def __init__(self, value):
            self.value = value
    """
)


def use_a_module_only_the_workers_have(folder: str, fail: bool) -> object:
    sys.path.insert(0, folder)  # in the worker only: the launcher cannot import this module
    import only_on_workers  # type: ignore[import-not-found]

    if fail:
        raise only_on_workers.OnlyHereError("from a class the launcher does not have")
    rank = dist.get_rank()
    return only_on_workers.OnlyHere(rank) if rank == 1 else rank


def test_an_exception_the_launcher_cannot_load_is_a_worker_error_saying_why(
    local: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "only_on_workers.py").write_text(ONLY_ON_WORKERS)
    with pytest.raises(trx.WorkerError) as info:
        trx.launch(use_a_module_only_the_workers_have, {"folder": str(tmp_path), "fail": True}, **local)
    error = info.value
    assert (error.type_name, error.message) == ("OnlyHereError", "from a class the launcher does not have")
    notes = "\n".join(error.__notes__)
    assert "could not be unpickled in the launcher: ModuleNotFoundError" in notes
    assert 'raise only_on_workers.OnlyHereError("from a class the launcher does not have")' in notes


def test_a_return_value_the_launcher_cannot_load_names_its_rank_and_keeps_the_other_results(
    local: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "only_on_workers.py").write_text(ONLY_ON_WORKERS)
    with pytest.raises(trx.ResultUnpicklingError) as info:
        trx.launch(
            use_a_module_only_the_workers_have,
            {"folder": str(tmp_path), "fail": False},
            workers_per_host=3,
            **local,
        )
    error = info.value
    assert error.ranks == [1]
    assert "the return value of rank 1 (host 'localhost', local rank 1) cannot be unpickled" in str(error)
    assert "No module named 'only_on_workers'" in str(error)
    assert isinstance(error.__cause__, ModuleNotFoundError)
    assert dict(error.results) == {0: 0, 2: 2}


# --------------------------------------------------------------------------- forked children
def fork_and_return(how: str) -> str:
    pid = os.fork()
    if pid == 0:  # the child comes back out through the function, as the worker itself would
        if how == "raise":
            raise RuntimeError("raised in the forked child")
        if how == "exit":
            sys.exit(0)
        import logging

        logging.getLogger("child").warning("a record from the forked child")
        return "the child's"
    _, status = os.waitpid(pid, 0)
    return f"the worker's (child: {os.waitstatus_to_exitcode(status)})"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("how", "child_exit"), [("return", 0), ("raise", 1), ("exit", 0)])
def test_a_forked_child_that_returns_through_the_function_never_speaks_for_its_rank(
    local: dict[str, Any], how: str, child_exit: int
) -> None:
    results = trx.launch(fork_and_return, {"how": how}, workers_per_host=2, **local)
    assert dict(results) == {rank: f"the worker's (child: {child_exit})" for rank in (0, 1)}
    text = log_text(local["logs"], "_localhost_1.log")
    if how == "raise":
        assert "RuntimeError: raised in the forked child" in text  # its traceback, as its own output
    if how == "return":
        assert "a record from the forked child" in text
