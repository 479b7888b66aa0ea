"""torchrunx inside real SLURM jobs: a two-node cluster (tests/slurmbed.py) whose nodes are two
network-namespace hosts, each with its own slurmd and sshd.

Each test submits a batch job whose script is a launcher (`JOB` below, run with this
interpreter): it launches with ``hostnames="slurm"`` and writes what it got (results, or the
type and message of the error it caught) to a file that the test reads. Every test checks
afterwards that nothing of the job is left on either host.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from slurmbed import ENDED, SlurmCluster

pytestmark = pytest.mark.multihost

NO_LEFTOVERS_S = 5.0  # what the issue promises after scancel or a time limit

JOB = r'''"""A launcher inside a SLURM job: python job.py SCENARIO OUTPUT LAUNCHER-FIELDS-JSON"""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

import torchrunx as trx


def where_and_sum():
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    return {
        "host": socket.gethostname(), "local_rank": int(os.environ["LOCAL_RANK"]), "total": total.item(),
        "step": os.environ.get("SLURM_STEP_ID"), "cwd": os.getcwd(), "python": sys.executable,
        "value": os.environ.get("TORCHRUNX_TEST_VALUE"), "from_env_file": os.environ.get("FROM_ENV_FILE"),
    }


def last_rank_divides_by_zero():
    if dist.get_rank() == dist.get_world_size() - 1:
        return 1 / 0
    return None


def last_rank_kills_its_agent():
    if dist.get_rank() == dist.get_world_size() - 1:
        time.sleep(0.3)  # the agent relays the worker's start before it is killed
        os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(300)


def wait_forever(ready):
    Path(ready, os.environ["RANK"]).touch()
    time.sleep(300)


def note_signals(ready):
    """Note every SIGTERM, SIGUSR1 and SIGUSR2 in READY/RANK.got, and go on running."""
    rank = os.environ["RANK"]
    got = []
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda signum, frame: got.append(signal.Signals(signum).name))
    Path(ready, rank).touch()
    written = 0
    while True:
        if len(got) > written:
            written = len(got)
            Path(ready, f"{rank}.got").write_text(",".join(got))
        time.sleep(0.02)


def stop_steps(ready):
    """Start a step through the srun executor, stop it; how long it took, how long until it was gone."""
    from trx_core import AgentSpec
    from trx_remote.srun import SrunExecutor

    code = {
        "runs": "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(300)",
        "ignores SIGTERM": "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').close(); time.sleep(300)",
    }
    env = {name: value for name, value in os.environ.items() if name.startswith("TORCH") or name == "PATH"}
    timings = {}
    for case in ("runs", "ignores SIGTERM", "srun killed"):
        started = Path(ready, case)
        args = ("-c", code.get(case, code["runs"]), str(started))
        spec = AgentSpec("host2", sys.executable, args, os.getcwd(), env, None, b"secret\n")
        process = SrunExecutor().start(spec)
        while not started.exists():
            assert process.poll() is None, process.poll()
            time.sleep(0.05)
        if case == "srun killed":  # the step outlives its srun, unless stop() cancels it
            srun = subprocess.run(["pgrep", "-P", str(os.getpid()), "srun"], capture_output=True, text=True)
            os.kill(int(srun.stdout.split()[0]), signal.SIGKILL)
            while process.poll() is None:
                time.sleep(0.05)
        begin = time.monotonic()
        process.stop()
        stopped = time.monotonic() - begin
        process.stop()  # idempotent
        job = os.environ["SLURM_JOB_ID"]
        steps = ["squeue", "-h", "-s", "-j", job, "-o", "%i"]
        while subprocess.run(steps, capture_output=True, text=True).stdout.split() != [f"{job}.batch"]:
            time.sleep(0.05)
        timings[case] = {"stop": stopped, "gone": time.monotonic() - begin, "end": process.poll()}
    return timings


scenario, output, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
func_kwargs = fields.pop("func_kwargs", {})
try:
    if scenario == "stop_steps":
        results = stop_steps(**func_kwargs)
    else:
        results = dict(trx.launch(globals()[scenario], func_kwargs, **fields))
    report = {"results": {str(key): value for key, value in results.items()}}
except Exception as e:
    report = {"error": type(e).__name__, "message": str(e)}
Path(output).write_text(json.dumps(report))
print(json.dumps(report))
'''


@pytest.fixture
def cluster(slurm_bed: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, idle; fails the test if anything of it is left on a host afterwards."""
    slurm_bed.wait_idle()
    yield slurm_bed
    left = slurm_bed.wait_no_leftovers()
    assert not left, f"processes left on the nodes after the test: {left}"


def job_body(tmp_path: Path, scenario: str, prelude: str = "", **fields: Any) -> tuple[str, Path]:
    """The batch script's body running `scenario` with launcher `fields` after the shell commands
    of `prelude`; and the file where it reports."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    output = tmp_path / f"{scenario}.json"
    fields = {"hostnames": "slurm", "backend": "gloo", "logs": str(tmp_path / "logs"), "timeout": 60, **fields}
    argv = [sys.executable, str(script), scenario, str(output), json.dumps(fields)]
    return f"{prelude}\nexec {shlex.join(argv)}", output


def run_job(
    cluster: SlurmCluster,
    tmp_path: Path,
    options: list[str],
    scenario: str,
    *,
    sbatch_wait: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """Run `scenario` in a batch job with sbatch `options`, wait for its end, return its report.
    With `sbatch_wait`, wait as users do (``sbatch --wait``); else by watching the job, which is quicker."""
    body, output = job_body(tmp_path, scenario, **fields)
    job = cluster.sbatch(body, options, timeout=90) if sbatch_wait else cluster.run_job(body, options, timeout=90)
    assert output.exists(), f"job {job.job_id} wrote no report:\n{job.output}"
    report: dict[str, Any] = json.loads(output.read_text())
    return report


def executor_fields(cluster: SlurmCluster, executor: str) -> dict[str, Any]:
    """Launcher fields for `executor` on the cluster's hosts."""
    if executor == "ssh":
        return {"executor": "ssh", "ssh_config_file": str(cluster.hosts.ssh_config)}
    return {"executor": executor}


# --------------------------------------------------------------------------- a run inside a job
@pytest.mark.timeout(120)
@pytest.mark.parametrize("executor", ["slurm", "ssh", "auto"])
def test_sbatch_job_runs_four_ranks_on_both_nodes_with_an_all_reduce_across_them(
    cluster: SlurmCluster, tmp_path: Path, executor: str
) -> None:
    env_file = tmp_path / "env.sh"
    env_file.write_text('export FROM_ENV_FILE="sourced on $(hostname)"\n')
    value = 'two words\nand a "quote" $HOME'
    report = run_job(
        cluster, tmp_path, ["-N2", "--ntasks-per-node=2"], "where_and_sum", sbatch_wait=True,
        prelude=f"export TORCHRUNX_TEST_VALUE={shlex.quote(value)}", env_file=str(env_file),
        **executor_fields(cluster, executor),
    )  # fmt: skip
    assert "results" in report, report
    workers = [report["results"][str(rank)] for rank in range(4)]
    assert [(w["host"], w["local_rank"]) for w in workers] == [("host1", 0), ("host1", 1), ("host2", 0), ("host2", 1)]
    assert {w["total"] for w in workers} == {10.0}  # 1 + 2 + 3 + 4, summed over both nodes
    # the same environment, env_file, working directory and interpreter, whatever the executor
    assert {w["value"] for w in workers} == {value}
    assert [w["from_env_file"] for w in workers] == [f"sourced on {w['host']}" for w in workers]
    assert {(w["cwd"], w["python"]) for w in workers} == {(str(cluster.workdir), sys.executable)}
    steps = {w["step"] for w in workers}
    if executor == "slurm":  # each agent, and so its workers, ran in a job step of its own
        assert None not in steps and len(steps) == 2, steps
    elif executor == "auto":  # this node's agent is the launcher's child (in the batch step), host2's a step
        assert [w["step"] is None for w in workers] == [True, True, False, False], steps
    else:
        assert steps == {None}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("options", "workers"),
    [(["-N2", "--ntasks-per-node=1"], {"host1": 1, "host2": 1}), (["-n3", "-N2"], {"host1": 2, "host2": 1})],
    ids=["ntasks-per-node=1", "n3-N2"],
)
def test_workers_per_host_auto_follows_the_allocation(
    cluster: SlurmCluster, tmp_path: Path, options: list[str], workers: dict[str, int]
) -> None:
    report = run_job(cluster, tmp_path, options, "where_and_sum", executor="slurm", workers_per_host="auto")
    assert "results" in report, report
    hosts = [w["host"] for w in report["results"].values()]
    assert {host: hosts.count(host) for host in hosts} == workers
    assert {w["total"] for w in report["results"].values()} == {float(sum(range(1, len(hosts) + 1)))}


@pytest.mark.timeout(120)
def test_stopping_an_agent_step_cancels_it_within_seconds(cluster: SlurmCluster, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    report = run_job(cluster, tmp_path, ["-N2"], "stop_steps", func_kwargs={"ready": str(ready)})
    assert "results" in report, report
    timings = report["results"]
    assert set(timings) == {"runs", "ignores SIGTERM", "srun killed"}
    for case, timing in timings.items():
        assert timing["stop"] < 5.0 and timing["gone"] < 5.0, (case, timing)
        assert timing["end"], case  # how it ended, for an error message
    assert "srun" in timings["srun killed"]["end"] and "SIGKILL" in timings["srun killed"]["end"]


# --------------------------------------------------------------------------- failures inside a job
@pytest.mark.timeout(120)
def test_a_worker_exception_in_a_job_step_is_reraised_with_its_type(cluster: SlurmCluster, tmp_path: Path) -> None:
    report = run_job(cluster, tmp_path, ["-N2", "--ntasks-per-node=2"], "last_rank_divides_by_zero", executor="slurm")
    assert report.get("error") == "ZeroDivisionError", report


@pytest.mark.timeout(120)
def test_a_killed_agent_in_a_job_step_is_an_agent_failed_error_naming_its_host(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    report = run_job(cluster, tmp_path, ["-N2", "--ntasks-per-node=2"], "last_rank_kills_its_agent", executor="slurm")
    assert report.get("error") == "AgentFailedError", report
    assert "'host2'" in report["message"] and "SIGKILL" in report["message"], report


@pytest.mark.timeout(120)
def test_a_host_outside_the_allocation_is_refused_before_any_agent_starts(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    report = run_job(
        cluster, tmp_path, ["-N1", "-w", "host1"], "where_and_sum", hostnames=["host1", "host2"], executor="slurm"
    )
    assert report.get("error") == "ConfigurationError", report
    assert "'host2' is not a node of SLURM job" in report["message"], report


@pytest.mark.timeout(30)
def test_the_slurm_executor_outside_an_allocation_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(trx.ConfigurationError, match="not inside a SLURM allocation"):
        trx.launch(str, hostnames=["localhost"], executor="slurm", logs=tmp_path / "logs")


@pytest.mark.timeout(30)
def test_the_slurm_executor_without_srun_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun there
    with pytest.raises(trx.ConfigurationError, match="srun"):
        trx.launch(str, hostnames=["localhost"], executor="slurm", logs=tmp_path / "logs")


# --------------------------------------------------------------------------- the job ends under the run
def start_waiting_job(
    cluster: SlurmCluster, tmp_path: Path, options: list[str], scenario: str = "wait_forever", **fields: Any
) -> int:
    """Submit a job whose 4 workers wait forever; return its id once every worker runs."""
    ready = tmp_path / "ready"
    ready.mkdir()
    body, _ = job_body(tmp_path, scenario, func_kwargs={"ready": str(ready)}, **fields)
    job = cluster.submit(body, ["-N2", "--ntasks-per-node=2", *options])
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < 4:
        assert time.monotonic() < deadline, f"workers not all started after 60 s: {sorted(os.listdir(ready))}"
        assert cluster.job_state(job.job_id) in ("PENDING", "CONFIGURING", "RUNNING"), "the job ended early"
        time.sleep(0.1)
    return job.job_id


@pytest.mark.timeout(120)
@pytest.mark.parametrize("executor", ["slurm", "ssh"])
def test_scancel_mid_run_leaves_no_process_on_either_node(cluster: SlurmCluster, tmp_path: Path, executor: str) -> None:
    fields = {"executor": "slurm"} | executor_fields(cluster, executor)
    job_id = start_waiting_job(cluster, tmp_path, [], **fields)
    assert cluster.run(["scancel", str(job_id)]).returncode == 0
    cancelled = time.monotonic()
    left = cluster.wait_no_leftovers(NO_LEFTOVERS_S)
    assert not left, f"left {time.monotonic() - cancelled:.1f} s after scancel: {left}"


@pytest.mark.timeout(150)
def test_a_time_limit_hit_mid_run_leaves_no_process_on_either_node(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = start_waiting_job(cluster, tmp_path, ["--time=5"], executor="slurm")
    # A limit already passed: the controller ends the job at its next time-limit check (every 30 s).
    assert cluster.run(["scontrol", "update", f"jobid={job_id}", "TimeLimit=0"]).returncode == 0
    assert cluster.wait_job_state(job_id, ("TIMEOUT",), timeout=60) == "TIMEOUT"
    timed_out = time.monotonic()
    left = cluster.wait_no_leftovers(NO_LEFTOVERS_S)
    assert not left, f"left {time.monotonic() - timed_out:.1f} s after the time limit: {left}"


# --------------------------------------------------------------------------- signals, preemption
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "executor"),
    [("SIGTERM", "auto"), ("SIGUSR1", "auto"), ("SIGUSR2", "auto"), ("SIGUSR1", "slurm"), ("SIGUSR1", "ssh")],
)
def test_a_signal_to_the_batch_launcher_reaches_every_worker_on_both_nodes_then_the_run_is_stopped(
    cluster: SlurmCluster, tmp_path: Path, name: str, executor: str
) -> None:
    fields = executor_fields(cluster, executor) | {"signal_grace": 2}
    job_id = start_waiting_job(cluster, tmp_path, [], scenario="note_signals", **fields)
    # To the batch shell only, as `sbatch --signal=B:...` does; the job's script exec'd the launcher
    signalled = cluster.run(["scancel", f"--signal={name.removeprefix('SIG')}", "--batch", str(job_id)])
    assert signalled.returncode == 0, signalled.stderr
    cluster.wait_job_state(job_id, ("", *ENDED), timeout=60)
    ended = time.monotonic()
    report = json.loads((tmp_path / "note_signals.json").read_text())
    assert report.get("error") == "RunInterrupted", report
    assert report["message"].startswith(f"the run was interrupted by {name}: it was sent on to every worker, and ")
    assert "stopped after signal_grace=2 s, with ranks 0, 1, 2, 3 still running" in report["message"], report
    got = {rank: (tmp_path / "ready" / f"{rank}.got").read_text() for rank in range(4)}
    assert got == dict.fromkeys(range(4), name)  # once each: the launcher's, not also SLURM's
    left = cluster.wait_no_leftovers(NO_LEFTOVERS_S)
    assert not left, f"left {time.monotonic() - ended:.1f} s after the job ended: {left}"


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "preemptible.py"


@pytest.mark.timeout(240)
def test_preemptible_example_checkpoints_on_a_warning_and_the_requeued_job_resumes_from_it(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    argv = [sys.executable, str(EXAMPLE), "--checkpoint", str(checkpoint), "--steps", "100", "--save-every", "1000"]
    body = f"export TORCHRUNX_LOG_DIR={shlex.quote(str(tmp_path / 'logs'))}\nexec {shlex.join(argv)}"
    # append: the requeued run writes after the first one
    job = cluster.submit(body, ["-N2", "--ntasks-per-node=2", "--requeue", "--open-mode=append"])
    deadline = time.monotonic() + 90
    while "step 20 " not in job.output:
        assert time.monotonic() < deadline, job.output
        assert cluster.job_state(job.job_id) in ("PENDING", "CONFIGURING", "RUNNING"), job.output
        time.sleep(0.1)
    # The warning `sbatch --signal=B:USR1@<seconds>` would send before the time limit, sent now
    assert cluster.run(["scancel", "--signal=USR1", "--batch", str(job.job_id)]).returncode == 0
    # The script requeued its job; SLURM holds a requeued job back for a while (BeginTime): not here
    deadline = time.monotonic() + 60
    while "Restarts=1" not in (shown := cluster.run(["scontrol", "show", "job", str(job.job_id)]).stdout):
        assert time.monotonic() < deadline, shown + job.output
        time.sleep(0.1)
    cluster.wait_job_state(job.job_id, ("PENDING",), timeout=30)
    # SLURM holds a requeued job back: started again within the second in which the first run's
    # credential was revoked (times in whole seconds), it is killed ("Job credential revoked").
    # Release it once its nodes are idle and that second is over.
    deadline = time.monotonic() + 60
    while set(states := cluster.run(["sinfo", "-h", "-o", "%T"]).stdout.split()) != {"idle"}:
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
    time.sleep(2.0)
    assert cluster.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"]).returncode == 0
    assert cluster.wait_job_state(job.job_id, ("", *ENDED), timeout=120) in ("", "COMPLETED"), job.output
    output = job.output
    saved = int(output.split("interrupted by SIGUSR1: checkpoint at step ")[1].split()[0])
    assert 20 <= saved < 100, output
    assert f"[host1 rank 0] resumed from step {saved}" in output
    assert f"finished: step 100 (started at {saved}) on 4 workers" in output
    left = cluster.wait_no_leftovers(NO_LEFTOVERS_S)
    assert not left, f"processes left on the nodes: {left}"


def hostname_and_step() -> tuple[str, str | None]:
    import socket

    return socket.gethostname(), os.environ.get("SLURM_STEP_ID")


@pytest.mark.timeout(120)
def test_a_launcher_outside_the_allocation_starts_steps_in_the_job_named_by_slurm_job_id(
    cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = cluster.submit("sleep 300", ["-N2"])
    try:
        cluster.wait_job_state(job.job_id, ("RUNNING",), timeout=30)
        monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
        monkeypatch.setenv("SLURM_JOB_ID", str(job.job_id))  # as a user on a login node would
        results = trx.launch(
            hostname_and_step, hostnames=cluster.nodes, workers_per_host=1, executor="slurm",
            backend="gloo", logs=tmp_path / "logs",
            # this machine does not resolve the bed's node names, as a login node would
            launcher_address=cluster.hosts.launcher_address,
        )  # fmt: skip
        assert [host for host, _ in results.values()] == ["host1", "host2"]
        assert None not in {step for _, step in results.values()}  # each in a step of that job
    finally:
        cluster.run(["scancel", str(job.job_id)])
        cluster.wait_job_state(job.job_id, ("", *ENDED), timeout=30)
