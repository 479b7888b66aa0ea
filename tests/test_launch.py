"""A launch on this machine: return values, the worker environment, the process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import torchrunx as trx


def rank_and_args(a: int, b: int = 0) -> tuple[int, int, int]:
    return dist.get_rank(), a, b


def test_every_rank_returns_its_value_indexed_by_global_rank(local: dict[str, Any]) -> None:
    results = trx.launch(rank_and_args, {"a": 5}, func_args=None, workers_per_host=3, **local)
    assert len(results) == 3
    assert results[0] == (0, 5, 0)
    assert dict(results) == {r: (r, 5, 0) for r in range(3)}
    assert results.rank(2) == (2, 5, 0)
    assert results.index("localhost", 1) == (1, 5, 0)
    with pytest.raises(KeyError, match="local rank 7"):
        results.index("localhost", 7)


def test_positional_and_keyword_arguments_reach_the_function(local: dict[str, Any]) -> None:
    results = trx.launch(rank_and_args, {"b": 2}, func_args=[1], workers_per_host=1, **local)
    assert results[0] == (0, 1, 2)


def worker_environment() -> dict[str, str]:
    names = [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ]
    return {n: os.environ[n] for n in names}


def test_every_worker_sees_its_ranks_and_the_rendezvous_address(local: dict[str, Any]) -> None:
    results = trx.launch(worker_environment, workers_per_host=2, **local)
    for rank in (0, 1):
        env = results[rank]
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == env["GROUP_RANK"] == "0"
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    assert results[0]["MASTER_PORT"] == results[1]["MASTER_PORT"]


def all_reduce_sum() -> tuple[str, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_backend(), t.item()


@pytest.mark.parametrize("backend", ["gloo", "auto"])
def test_process_group_is_ready_before_the_function_runs(local: dict[str, Any], backend: str) -> None:
    local["backend"] = backend
    results = trx.launch(all_reduce_sum, workers_per_host=3, **local)
    assert [results[r] for r in range(3)] == [("gloo", 6.0)] * 3  # no CUDA here: auto means gloo


def group_initialised() -> bool:
    return dist.is_initialized()


def test_backend_none_leaves_the_process_group_to_the_user(local: dict[str, Any]) -> None:
    local["backend"] = None
    assert dict(trx.launch(group_initialised, workers_per_host=2, **local)) == {0: False, 1: False}


def user_rendezvous() -> float:
    dist.init_process_group("gloo")  # env:// from MASTER_ADDR / MASTER_PORT
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def test_backend_none_gives_a_usable_master_address_for_env_rendezvous(local: dict[str, Any]) -> None:
    local["backend"] = None
    assert dict(trx.launch(user_rendezvous, workers_per_host=2, **local)) == {0: 2.0, 1: 2.0}


def test_a_launcher_is_reusable_and_every_run_gets_fresh_workers(local: dict[str, Any]) -> None:
    launcher = trx.Launcher(workers_per_host=2, **local)
    first = launcher.run(os.getpid)
    second = launcher.run(os.getpid)
    assert len(set(first.values()) | set(second.values())) == 4


_STATE: list[int] = []


def mutate_module_state() -> int:
    _STATE.append(1)
    return len(_STATE)


def test_workers_do_not_share_state_between_runs(local: dict[str, Any]) -> None:
    launcher = trx.Launcher(workers_per_host=1, **local)
    assert launcher.run(mutate_module_state)[0] == 1
    assert launcher.run(mutate_module_state)[0] == 1


def process_origin() -> tuple[int, str, bool]:
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().decode()
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        parent = f.read().decode()
    return os.getppid(), cmdline, cmdline == parent


def test_workers_are_forked_from_the_agent_that_already_imported_torch(local: dict[str, Any]) -> None:
    results = trx.launch(process_origin, workers_per_host=2, **local)
    (ppid0, cmdline, forked0), (ppid1, _, forked1) = results[0], results[1]
    assert ppid0 == ppid1 and forked0 and forked1  # same parent, same command line: a fork, no exec
    assert "trx_core.agent" in cmdline


def big_tensor() -> torch.Tensor | None:
    return torch.ones(25 * 2**20) if dist.get_rank() == 0 else None  # 100 MB


def test_a_100_mb_tensor_comes_back_intact(local: dict[str, Any]) -> None:
    results = trx.launch(big_tensor, workers_per_host=2, **local)
    assert results[1] is None
    assert results[0].shape == (25 * 2**20,) and bool(results[0].eq(1).all())


def launcher_sys_path_entry() -> bool:
    return os.path.dirname(__file__) in sys.path


def test_what_imports_in_the_launcher_imports_in_the_workers(local: dict[str, Any]) -> None:
    # this test module is imported by reference; the workers find it through the launcher's sys.path
    assert trx.launch(launcher_sys_path_entry, workers_per_host=1, **local)[0] is True


def test_seed_example_run_with_empty_kwargs(local: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    launcher = trx.Launcher(workers_per_host=2, **local)
    results = launcher.run(print_hello, {})
    assert dict(results) == {0: None, 1: None}
    assert "Hello world!" in capsys.readouterr().out


def print_hello() -> None:
    print("Hello world!")


def assorted_tensors() -> dict[str, Any]:
    base = torch.arange(50_000, dtype=torch.float32)
    return {
        "bf16": torch.ones(40_000, dtype=torch.bfloat16),
        "matrix": torch.arange(60_000, dtype=torch.int64).reshape(300, 200),
        "transposed": torch.arange(60_000, dtype=torch.float64).reshape(300, 200).t(),
        "base": base,
        "view_of_base": base[10:20],
        "param": torch.nn.Parameter(torch.ones(20_000)),
        "small": torch.tensor([1, 2, 3]),
    }


def test_returned_tensors_keep_dtype_layout_sharing_and_are_writable(local: dict[str, Any]) -> None:
    got = trx.launch(assorted_tensors, workers_per_host=1, **local)[0]
    want = assorted_tensors()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert isinstance(got["param"], torch.nn.Parameter) and got["param"].requires_grad
    assert got["transposed"].stride() == want["transposed"].stride()
    got["base"][15] = -1.0  # a view keeps sharing its base's memory, as it did in the worker
    assert got["view_of_base"][5].item() == -1.0
    got["matrix"].add_(1)  # tensors built over received bytes are ordinary, writable tensors
    assert got["matrix"][0, 0].item() == 1


def test_the_result_says_where_the_start_up_time_went(local: dict[str, Any]) -> None:
    results = trx.launch(os.getpid, workers_per_host=2, **local)
    phases = results.phases
    assert list(phases) == [
        "agents started",
        "agents connected",
        "agents ready",
        "workers started",
        "group formed",
        "returned",
    ]
    assert all(b >= a for a, b in zip(phases.values(), list(phases.values())[1:], strict=False))
    logs = local["logs"]
    (agent_log,) = [p for p in logs.glob("*_localhost.log")]  # type: ignore[union-attr]
    assert "ready" in agent_log.read_text() and "after the agent started" in agent_log.read_text()


NO_TORCH_SCRIPT = """
import sys
import torchrunx as trx

def rank():
    import torch.distributed as dist
    return dist.get_rank()

if __name__ == "__main__":
    results = trx.launch(rank, hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=None, log_console=None)
    print(dict(results), "torch" in sys.modules)
"""


def test_a_launcher_that_touches_no_tensor_never_imports_torch(tmp_path: Path) -> None:
    script = tmp_path / "launch.py"
    script.write_text(NO_TORCH_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "{0: 0, 1: 1} False"
