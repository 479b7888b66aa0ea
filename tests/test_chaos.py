"""The chaos matrix: every way a run can break, at every phase, on one host and on two hosts
over SSH. Each cell asserts that the caller gets the right error within a stated bound (or
that a killed launcher takes its run with it), that no process of the run is left 5 s later
on any host, and that what the failing process printed last is in its log file.

Phases: ``startup`` — the failing rank fails while unpickling its arguments, before the
process group exists; ``collective`` — its peers wait for it inside a barrier;
``teardown`` — its peers have already returned. Set ``TRX_CHAOS_REPORT=<file>`` to get one
line per cell with the measured detection time and the count of processes left.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import torchrunx as trx
from conftest import processes_with_tag, wait_until_gone

WORKER_KINDS = ["raise", "sys.exit", "os._exit", "SIGKILL", "SIGSEGV", "children", "agent-SIGKILL"]
LAUNCHER_KINDS = ["launcher-SIGKILL", "launcher-SIGTERM", "launcher-Ctrl-C"]
PHASES = ["startup", "collective", "teardown"]
TOPOLOGIES = ["local", "ssh"]

DETECTION_BOUND_S = 3.0  # from the failure to the exception in the caller
HEARTBEAT_S = 3  # heartbeat_timeout of these runs: how long a host may stay silent
CLEANUP_BOUND_S = 5.0


class ChaosError(Exception):
    pass


EXPECTED: dict[str, tuple[type[BaseException], str]] = {
    "raise": (ChaosError, "chaos in rank"),
    "children": (ChaosError, "chaos in rank"),
    "sys.exit": (trx.WorkerFailedError, "exit code 3"),
    "os._exit": (trx.WorkerFailedError, "exit code 5"),
    "SIGKILL": (trx.WorkerFailedError, "killed by signal SIGKILL"),
    "SIGSEGV": (trx.WorkerFailedError, "killed by signal SIGSEGV"),
    "agent-SIGKILL": (trx.AgentFailedError, "SIGKILL"),
    "unreachable": (trx.AgentFailedError, "stopped answering"),
}


# --------------------------------------------------------------------------- in the workers
def fail(kind: str, stamp: str) -> None:
    """Break this worker as `kind` says, after saying so and noting the time."""
    rank = os.environ["RANK"]
    print(f"last words of rank {rank}", flush=True)
    if kind == "children":
        subprocess.Popen(["sleep", "300"])
        subprocess.Popen(["sleep", "300"], start_new_session=True)
    if kind == "agent-SIGKILL":
        time.sleep(0.3)  # the agent relays the last words before it is killed
    Path(stamp).write_text(repr(time.time()))
    if kind in ("raise", "children"):
        raise ChaosError(f"chaos in rank {rank}")
    if kind == "sys.exit":
        sys.exit(3)
    if kind == "os._exit":
        os._exit(5)
    if kind == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "SIGSEGV":
        ctypes.string_at(0)  # a real segmentation fault
    if kind == "agent-SIGKILL":
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(300)


class Trigger:
    """An argument that breaks the failing rank while the workers unpickle their arguments."""

    def __init__(self, kind: str, phase: str, rank: int, stamp: str) -> None:
        self.kind, self.phase, self.rank, self.stamp = kind, phase, rank, stamp

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.phase == "startup" and os.environ["RANK"] == str(self.rank):
            fail(self.kind, self.stamp)


def chaos(trigger: Trigger) -> str:
    rank = dist.get_rank()
    if rank == trigger.rank:
        time.sleep(0.5)  # the others are in the barrier, or have returned, by now
        fail(trigger.kind, trigger.stamp)
        time.sleep(300)  # "unreachable": the host is cut off while this rank runs
    elif trigger.phase != "teardown":
        dist.barrier()
    return "done"


# --------------------------------------------------------------------------- topologies
@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Launcher fields for one host, or for the two SSH hosts of the multi-host test bed."""
    fields: dict[str, Any] = {
        "workers_per_host": 2,
        "backend": "gloo",
        "logs": tmp_path / "logs",
        "timeout": 60,
        "heartbeat_timeout": HEARTBEAT_S,
    }
    if request.param == "local":
        yield {**fields, "hostnames": ["localhost"]}
        return
    bed = request.getfixturevalue("multihost_bed")
    yield {**fields, "hostnames": bed.aliases, "ssh_config_file": str(bed.ssh_config)}
    left = bed.wait_no_leftovers(timeout=CLEANUP_BOUND_S)
    assert not left, f"processes left on the hosts: {left}"


def report(cell: str, detection: float | None, left: int) -> None:
    path = os.environ.get("TRX_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"cell": cell, "detection_s": detection, "left": left}) + "\n")


def last_rank(fields: dict[str, Any]) -> tuple[int, str, int]:
    """(global rank, host, local rank) of the run's last worker: the one that fails."""
    hosts = fields["hostnames"]
    return 2 * len(hosts) - 1, hosts[-1], 1


def worker_log(fields: dict[str, Any], host: str, local_rank: int) -> str:
    files = list(Path(fields["logs"]).glob(f"*_{host}_{local_rank}.log"))
    assert len(files) == 1, files
    return files[0].read_text()


# --------------------------------------------------------------------------- worker and agent failures
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", WORKER_KINDS)
def test_a_failing_worker_or_agent_is_reported_and_the_run_cleaned_up(
    topology: dict[str, Any], tmp_path: Path, tag: str, kind: str, phase: str
) -> None:
    rank, host, local_rank = last_rank(topology)
    stamp = tmp_path / "failed_at"
    expected, text = EXPECTED[kind]
    with pytest.raises(expected, match=text):
        trx.launch(chaos, {"trigger": Trigger(kind, phase, rank, str(stamp))}, **topology)
    detection = time.time() - float(stamp.read_text())
    left = wait_until_gone(tag, CLEANUP_BOUND_S)
    report(f"{kind}/{phase}/{len(topology['hostnames'])} host(s)", detection, len(left))
    assert detection < DETECTION_BOUND_S
    assert not left
    assert f"last words of rank {rank}" in worker_log(topology, host, local_rank)


@pytest.mark.parametrize("topology", ["ssh"], indirect=True)  # needs a second host to cut off
def test_a_host_cut_off_from_the_network_is_reported_and_its_processes_stop(
    topology: dict[str, Any], tmp_path: Path, tag: str, multihost_bed: Any
) -> None:
    netns = multihost_bed.hosts[-1].netns
    rank, host, _ = last_rank(topology)
    stamp = tmp_path / "failed_at"
    cutter = subprocess.Popen(  # cuts the host's link once its last rank has started failing
        ["sh", "-c", f'while [ ! -e "$1" ]; do sleep 0.02; done; ip -n {netns} link set eth0 down', "sh", stamp]
    )
    try:
        with pytest.raises(trx.AgentFailedError, match="stopped answering") as info:
            trx.launch(chaos, {"trigger": Trigger("unreachable", "collective", rank, str(stamp))}, **topology)
        detection = time.time() - float(stamp.read_text())
        assert info.value.hostname == host
        # The cut-off host's agent hears nothing from the launcher either, and stops its workers.
        left = [p for p in wait_until_gone(tag, HEARTBEAT_S + CLEANUP_BOUND_S) if _in_netns(p, netns)]
    finally:
        cutter.wait(10)
        subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
    report("unreachable/collective/2 hosts", detection, len(left))
    assert detection < HEARTBEAT_S + DETECTION_BOUND_S
    assert not left


def _in_netns(pid: int, netns: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/run/netns/{netns}")
    except OSError:
        return False


# --------------------------------------------------------------------------- the launcher killed
LAUNCHER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch.distributed as dist
    import torchrunx as trx

    def wait(phase, ready):
        rank = dist.get_rank()
        print(f"ready rank {rank}", flush=True)
        if phase == "teardown" and rank == 0:
            return "done"
        open(os.path.join(ready, str(rank)), "w").close()
        if rank == 0 or phase == "teardown":
            time.sleep(300)  # rank 0 keeps the others waiting in the barrier for good
        dist.barrier()

    if __name__ == "__main__":
        phase, ready, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        trx.launch(wait, {"phase": phase, "ready": ready}, **fields)
    """
)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", LAUNCHER_KINDS)
def test_a_killed_or_interrupted_launcher_takes_every_process_of_its_run_with_it(
    topology: dict[str, Any], tmp_path: Path, tag: str, kind: str, phase: str
) -> None:
    script, ready = tmp_path / "launcher.py", tmp_path / "ready"
    script.write_text(LAUNCHER_SCRIPT)
    ready.mkdir()
    fields = {**topology, "logs": str(topology["logs"])}
    launcher = subprocess.Popen([sys.executable, str(script), phase, str(ready), json.dumps(fields)])
    workers = 2 * len(topology["hostnames"])
    waiting_for = workers - 1 if phase == "teardown" else workers
    deadline = time.monotonic() + 60
    try:
        while not _phase_reached(phase, tag, ready, waiting_for):
            assert launcher.poll() is None and time.monotonic() < deadline, f"phase {phase} not reached"
            time.sleep(0.01)
        if phase != "startup":
            time.sleep(0.5)  # the workers' "ready" lines reach the launcher's files
        launcher.send_signal({"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}.get(kind[9:], signal.SIGINT))
        killed_at = time.monotonic()
        launcher.wait(10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    left = wait_until_gone(tag, CLEANUP_BOUND_S)
    report(f"{kind}/{phase}/{len(topology['hostnames'])} host(s)", time.monotonic() - killed_at, len(left))
    assert not left
    if phase != "startup":
        for host in topology["hostnames"]:
            assert "ready rank" in worker_log(topology, host, 1)


def _phase_reached(phase: str, tag: str, ready: Path, count: int) -> bool:
    if phase == "startup":  # an agent has started; no worker yet
        return any(b"trx_core.agent" in _cmdline(p) for p in processes_with_tag(tag))
    return len(list(ready.iterdir())) >= count


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
