"""The plan as pure functions: hosts, worker counts, ranks and worker environments, without
starting a single process."""

from __future__ import annotations

import os

import pytest

import torchrunx as trx
from trx_core import plan
from trx_core.plan import HostReport, WorkerSettings

pytestmark = pytest.mark.timeout(30)

GPU_BOX = HostReport("gpu-box", gpus=4, cpus=64)
CPU_BOX = HostReport("cpu-box", gpus=0, cpus=8)


@pytest.mark.parametrize(
    ("setting", "reports", "counts"),
    [
        (3, [GPU_BOX, CPU_BOX], [3, 3]),
        ([2, 5], [GPU_BOX, CPU_BOX], [2, 5]),
        ((1, 1, 2), [CPU_BOX, CPU_BOX, GPU_BOX], [1, 1, 2]),
        ("gpu", [GPU_BOX, GPU_BOX], [4, 4]),
        ("cpu", [GPU_BOX, CPU_BOX], [64, 8]),
        ("auto", [GPU_BOX, CPU_BOX], [4, 1]),
        ("auto", [CPU_BOX], [1]),
    ],
    ids=["number", "uneven-list", "tuple", "gpu", "cpu", "auto-mixed", "auto-cpu-only"],
)
def test_worker_counts_follow_every_form_of_workers_per_host(
    setting: object, reports: list[HostReport], counts: list[int]
) -> None:
    assert plan.worker_counts(setting, reports) == counts  # type: ignore[arg-type]


def test_workers_per_host_gpu_on_a_host_without_gpus_is_refused_naming_it() -> None:
    with pytest.raises(trx.ConfigurationError, match="'cpu-box' has no GPU"):
        plan.worker_counts("gpu", [GPU_BOX, CPU_BOX])


def test_nccl_on_a_host_without_gpus_is_refused_and_gloo_is_not() -> None:
    with pytest.raises(trx.ConfigurationError, match=r"nccl.*host 'b' has none"):
        plan.check_backend("nccl", ["a", "b"], [GPU_BOX, CPU_BOX])
    plan.check_backend("gloo", ["a", "b"], [GPU_BOX, CPU_BOX])
    plan.check_backend("auto", ["a", "b"], [GPU_BOX, CPU_BOX])
    plan.check_backend("nccl", ["a"], [GPU_BOX])


def test_ranks_are_numbered_host_by_host_with_each_workers_environment() -> None:
    settings = WorkerSettings(run_id="r1", backend="gloo", timeout=60, argv=("train.py", "--lr", "3"))
    rendezvous = [("127.0.0.1", 5000), ("10.0.0.1", 5000), ("10.0.0.1", 5000)]
    workers = plan.plan_workers([2, 1, 3], rendezvous, settings)
    assert [[w.rank for w in host] for host in workers] == [[0, 1], [2], [3, 4, 5]]
    assert [[w.local_rank for w in host] for host in workers] == [[0, 1], [0], [0, 1, 2]]
    last = workers[2][2]
    assert last.env["RANK"] == "5" and last.env["LOCAL_RANK"] == "2" and last.env["WORLD_SIZE"] == "6"
    assert last.env["LOCAL_WORLD_SIZE"] == "3" and last.env["NODE_RANK"] == last.env["GROUP_RANK"] == "2"
    assert (last.env["MASTER_ADDR"], last.env["MASTER_PORT"]) == ("10.0.0.1", "5000")
    assert workers[0][0].env["MASTER_ADDR"] == "127.0.0.1"
    # as torchrun sets them: libraries recognise an elastic launch, env:// uses our store
    assert last.env["TORCHELASTIC_RUN_ID"] == "r1" and last.env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert last.argv == ("train.py", "--lr", "3") and last.backend == "gloo" and last.timeout == 60
    assert plan.placement(["a", "b", "c"], [2, 1, 3]) == [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1), ("c", 2)]


def test_the_store_is_reached_on_each_hosts_route_when_host_0_is_this_machine() -> None:
    routes = ["127.0.0.1", "10.0.0.9", "192.168.1.9"]  # this machine, as each host reaches it
    assert plan.rendezvous_addresses(routes, "127.0.0.1", True, 7) == [
        ("127.0.0.1", 7),
        ("10.0.0.9", 7),
        ("192.168.1.9", 7),
    ]
    # host 0 elsewhere: everybody reaches it at its own address
    assert plan.rendezvous_addresses(["10.0.0.9", "10.0.0.9"], "10.0.0.5", False, 7) == [("10.0.0.5", 7)] * 2


def test_the_store_binds_loopback_for_a_run_on_this_machine_alone() -> None:
    assert plan.store_bind_address(["127.0.0.1", "127.0.0.1"]) == "127.0.0.1"
    assert plan.store_bind_address(["127.0.0.1", "10.0.0.9"]) == "0.0.0.0"  # others reach us on their routes
    assert plan.store_bind_address(["10.0.0.9", "10.0.0.9"]) == "route"  # host 0's own address


def test_agent_arguments_carry_no_secret_and_only_agent_0_hosts_the_store() -> None:
    first = plan.agent_args("10.0.0.9", 4000, 0, 15.0, "route")
    assert first[:2] == ("-m", "trx_core.agent") and "10.0.0.9:4000" in first
    assert first[-2:] == ("--store-host", "route")
    assert "--store-host" not in plan.agent_args("10.0.0.9", 4000, 1, 15.0, None)
    assert "[fe80::1]:4000" in plan.agent_args("fe80::1", 4000, 1, 15.0, None)


def test_a_host_list_is_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")  # a list wins over any allocation
    hosts = plan.plan_hosts(["a", "b"], [1, 2])
    assert hosts.hostnames == ("a", "b") and hosts.workers_per_host == [1, 2]


def test_auto_outside_any_allocation_is_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    assert plan.plan_hosts("auto", "auto") == plan.HostsPlan(("localhost",), "auto")


@pytest.mark.parametrize(
    ("environ", "hosts", "workers"),
    [
        ({"SLURM_NTASKS_PER_NODE": "2"}, ("n1", "n2"), (2, 2)),
        ({"SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"}, ("n1", "n2"), (2, 1)),
        ({"SLURM_GPUS_ON_NODE": "4"}, ("n1", "n2"), (4, 4)),
        ({}, ("n1", "n2"), "auto"),
    ],
    ids=["ntasks-per-node", "uneven-tasks", "gpus", "nothing-asked"],
)
def test_slurm_counts_become_the_workers_of_auto(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], hosts: tuple[str, ...], workers: object
) -> None:
    monkeypatch.setenv("PATH", "")  # no scontrol: the hostlist is parsed here
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    for name, value in {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", **environ}.items():
        monkeypatch.setenv(name, value)
    assert plan.plan_hosts("slurm", "auto") == plan.HostsPlan(hosts, workers)  # type: ignore[arg-type]
    assert plan.plan_hosts("auto", 3).workers_per_host == 3  # an explicit count wins


def test_the_launchers_script_is_mirrored_only_when_there_is_one() -> None:
    script = plan.launcher_script()
    assert script is None or os.path.isabs(script)
