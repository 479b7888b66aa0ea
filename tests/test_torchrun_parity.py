"""A worker looks like a torchrun worker to the libraries it runs, and calls in the forms of
upstream torchrunx are refused saying what to write instead."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx

pytestmark = pytest.mark.timeout(120)


def environment_and_argv() -> dict[str, Any]:
    names = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS", "ACCELERATE_USE_CPU", "MY_EXTRA")
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('OMP_NUM_THREADS'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {"env": {n: os.environ.get(n) for n in names}, "argv": sys.argv, "child_omp": child.stdout.strip()}


def test_workers_have_torchruns_variables_the_launchers_argv_and_export_omp_num_threads(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # copied by the default env_vars
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "0.1"])
    results = trx.launch(environment_and_argv, workers_per_host=2, extra_env_vars={"MY_EXTRA": "x y"}, **local)
    cores = len(os.sched_getaffinity(0))
    for rank in (0, 1):
        got = results[rank]
        assert got["env"]["TORCHELASTIC_RUN_ID"] and got["env"]["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert got["env"]["ACCELERATE_USE_CPU"] == "1" and got["env"]["MY_EXTRA"] == "x y"
        assert got["env"]["OMP_NUM_THREADS"] == got["child_omp"] == str(max(1, cores // 2))
        assert got["argv"] == ["train.py", "--lr", "0.1"]
    assert results[0]["env"]["TORCHELASTIC_RUN_ID"] == results[1]["env"]["TORCHELASTIC_RUN_ID"]


def reinitialise_the_process_group() -> int:
    import torch
    import torch.distributed as dist

    dist.destroy_process_group()
    dist.init_process_group("gloo")  # env://, as a library would: connects to the agent's store
    t = torch.ones(1)
    dist.all_reduce(t)
    return int(t.item())


def test_the_process_group_can_be_destroyed_and_initialised_again(local: dict[str, Any]) -> None:
    assert dict(trx.launch(reinitialise_the_process_group, workers_per_host=2, **local)) == {0: 2, 1: 2}


def parse_arguments() -> float:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1.0)
    return float(parser.parse_args().lr)


def test_argparse_in_the_function_parses_the_launchers_command_line(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "0.25"])
    assert trx.launch(parse_arguments, **local)[0] == 0.25


SCRIPT = """
import multiprocessing
import sys

import torch
import torch.multiprocessing as tmp
from torch.utils.data import DataLoader, Dataset

import torchrunx as trx


class Squares(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor(float(i * i))


def square(x):
    return x * x


def spawned(index, queue):
    queue.put(square(index + 3))


def work():
    loader = DataLoader(Squares(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    total = sum(float(batch.sum()) for batch in loader)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pooled = pool.map(square, [1, 2, 3])
    context = tmp.get_context("spawn")
    queue = context.SimpleQueue()
    tmp.spawn(spawned, args=(queue,), nprocs=1)
    return total, pooled, queue.get()


if __name__ == "__main__":
    results = trx.launch(work, hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=None, log_console=None)
    print(dict(results))
"""


def test_objects_of_the_users_script_pickle_in_the_workers_own_spawned_children(tmp_path: Path, tag: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{0: (140.0, [1, 4, 9], 9), 1: (140.0, [1, 4, 9], 9)}"


def log_with_a_handler_of_its_own() -> None:
    import logging

    logger = logging.getLogger("library")
    handler = logging.StreamHandler()  # to the worker's stderr, as Lightning's own handler does
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.info("printed once")
    logging.getLogger("quiet").warning("forwarded once")


def test_a_record_a_library_prints_itself_is_logged_once(local: dict[str, Any], tmp_path: Path) -> None:
    trx.launch(log_with_a_handler_of_its_own, **local)
    (worker_log,) = (tmp_path / "logs").glob("*_localhost_0.log")
    text = worker_log.read_text()
    assert text.count("printed once") == 1 and text.count("forwarded once") == 1


def add(a: int, b: int) -> int:
    return a + b


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: trx.launch(add, (1, 2), hostnames=["localhost"]), r"func_args=\(1, 2\)"),
        (lambda: trx.Launcher(hostnames=["localhost"]).run(add, [1, 2]), r"func_args=\[1, 2\]"),
        (lambda: trx.Launcher(hostnames=["localhost"]).run(add, 5), r"func_args=\(int\(\.\.\.\),\)"),
        (lambda: trx.Launcher(hostnames=["localhost"]).run(add, a=1, b=2), r"pass them as a dict"),
        (lambda: trx.launch(add, func_args="12", hostnames=["localhost"]), r"tuple or list"),
        (lambda: trx.launch(add, extra_env_vars={"A=B": "1"}, hostnames=["localhost"]), r"extra_env_vars must map"),
    ],
    ids=["upstream-0.2-positional", "list", "object-for-kwargs", "upstream-0.4-kwargs", "string-args", "bad-extra"],
)
def test_upstream_call_forms_are_refused_saying_what_to_write(call: Any, message: str, tag: str) -> None:
    from conftest import processes_with_tag

    with pytest.raises(trx.ConfigurationError, match=message):
        call()
    assert not processes_with_tag(tag)


def test_an_empty_log_dir_variable_means_no_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRUNX_LOG_DIR", "")
    assert trx.Launcher().logs is None
    monkeypatch.setenv("TORCHRUNX_LOG_DIR", "somewhere")
    assert trx.Launcher().logs == Path("somewhere")


def test_the_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert trx.__version__ == version("torchrunx")
