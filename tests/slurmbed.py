"""A real SLURM cluster on the hosts of tests/multihost.py, for tests of torchrunx under SLURM.

    with slurm_cluster(workdir) as cluster:
        cluster.run(["sinfo"])                                   # any SLURM client, on this cluster
        job = cluster.sbatch("python job.py", "-N2 --ntasks-per-node=2")   # waits for the job

Each host of the multi-host bed is a SLURM node of the same name (``host1``, ``host2``...): its
``slurmd`` joins the namespaces of that host's sshd (network, hostname, ``/etc/hosts``), so the
same hosts serve SLURM and SSH, and a job reaches the other hosts over SSH as well as through
``srun``. ``slurmctld`` and one ``munged`` run in this machine's own namespaces: the controller
on a port of its own (two beds at once do not meet), munge on a socket file that every host sees.
Nothing is written under /etc: clients find the cluster through ``SLURM_CONF`` (`SlurmCluster.env`;
``sbatch`` passes it on to the job, and so to every ``srun`` inside it). A batch script runs on
the first host.

Needs what tests/multihost.py needs, plus Debian's SLURM and munge packages
(``apt-get install --no-install-recommends slurmctld slurmd slurm-client munge``);
`multihost.Unavailable` says what is missing. Teardown stops the daemons, then the multi-host
bed kills whatever is left on the hosts (job steps included).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from multihost import TestBed, Unavailable, testbed

__all__ = ["ENDED", "Job", "SlurmCluster", "Unavailable", "prerequisites", "slurm_cluster"]

TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scancel", "scontrol", "squeue", "sinfo", "nsenter")
CPUS_PER_NODE = 4  # more than the machine may have: config_overrides makes slurmd believe slurm.conf


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE")


@dataclass(frozen=True)
class Job:
    """A batch job: its id, and the file its script's output goes to."""

    job_id: int
    output_file: Path

    @property
    def output(self) -> str:
        return self.output_file.read_text(errors="replace") if self.output_file.exists() else ""


@dataclass
class SlurmCluster:
    hosts: TestBed  # the network-namespace hosts; their aliases are the node names
    workdir: Path
    conf: Path
    env: dict[str, str]  # this environment plus SLURM_CONF: for every client command
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        return self.hosts.aliases

    def run(self, argv: list[str], timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster; capture its output as text."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload, no-any-return]

    def write_job(self, body: str, name: str = "job") -> Path:
        """A batch script running `body` with bash in `workdir`, output unbuffered."""
        script = self.workdir / f"{name}-{time.monotonic_ns()}.sh"
        script.write_text(f"#!/bin/bash\ncd {self.workdir}\nexport PYTHONUNBUFFERED=1\n{body}\n")
        script.chmod(0o755)
        return script

    def submit(self, body: str, options: list[str], *, wait: bool = False, timeout: float = 120) -> Job:
        """Submit `body` as a batch job with sbatch `options`; with `wait`, return once it has
        ended (``sbatch --wait``, which checks every 2 s)."""
        script = self.write_job(body)
        output = script.with_suffix(".out")
        argv = ["sbatch", "--parsable", *(["--wait"] if wait else []), *options, "-o", str(output), str(script)]
        done = self.run(argv, timeout=timeout)
        first = done.stdout.split(";")[0].strip()
        if not first.isdigit():
            raise RuntimeError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
        return Job(int(first), output)

    def sbatch(self, body: str, options: list[str], timeout: float = 120) -> Job:
        """Run `body` as a batch job and wait for its end with ``sbatch --wait``."""
        return self.submit(body, options, wait=True, timeout=timeout)

    def run_job(self, body: str, options: list[str], timeout: float = 120) -> Job:
        """Run `body` as a batch job and wait for its end, watching it more closely than sbatch does."""
        job = self.submit(body, options)
        self.wait_job_state(job.job_id, ("", *ENDED), timeout)
        return job

    def job_state(self, job_id: int) -> str:
        """The job's state as the controller says (``RUNNING``, ``CANCELLED``...); "" once forgotten."""
        out = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"]).stdout.strip()
        if out:
            return out
        shown = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return next((w.split("=", 1)[1] for w in shown.split() if w.startswith("JobState=")), "")

    def wait_job_state(self, job_id: int, states: tuple[str, ...], timeout: float = 30) -> str:
        """Until the job's state is one of `states` ("" is a job already forgotten); that state."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {state or 'gone'}, not in {states}, after {timeout:g} s")
            time.sleep(0.1)
        return state

    def leftover_processes(self) -> dict[str, list[str]]:
        """Per host, the processes in its namespace other than its sshd and its slurmd."""
        ours = {p.pid for p in self.daemons.values()}
        left = {}
        for host, rows in self.hosts.leftover_processes().items():
            rows = [row for row in rows if int(row.split()[0]) not in ours]
            if rows:
                left[host] = rows
        return left

    def wait_no_leftovers(self, timeout: float = 8.0) -> dict[str, list[str]]:
        """Poll until nothing of a job is left on any host; return what is left at the end."""
        deadline = time.monotonic() + timeout
        while (left := self.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def wait_idle(self, timeout: float = 30) -> None:
        """Until every node is idle (no job, no step still being cleaned up)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
            states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
            if done.returncode == 0 and sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}:
                return
            if time.monotonic() > deadline:
                logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in self._logs())
                raise RuntimeError(f"nodes not idle after {timeout:g} s: {done.stdout!r} {done.stderr!r}{logs}")
            time.sleep(0.1)

    def _logs(self) -> list[Path]:
        return sorted(self.workdir.glob("*.log"))


def prerequisites() -> None:
    """Raise `Unavailable` unless SLURM and munge are installed (multihost checks the rest)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise Unavailable(
            f"not installed: {', '.join(missing)} (apt-get install --no-install-recommends "
            "slurmctld slurmd slurm-client munge util-linux)"
        )


def _free_port(address: str) -> int:
    # Bound and released at once: another bed could take it before slurmctld does, but a
    # random port from the kernel's ephemeral range makes that unlikely, and it would fail loudly.
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _config(workdir: Path, bed: TestBed, port: int, munge_socket: Path) -> Path:
    spool = workdir / "spool"
    spool.mkdir(exist_ok=True)
    nodes = "".join(f"NodeName={h.alias} NodeAddr={h.address} CPUs={CPUS_PER_NODE} State=UNKNOWN\n" for h in bed.hosts)
    conf = workdir / "slurm.conf"
    conf.write_text(
        "ClusterName=trxtest\n"
        # slurmctld checks that it runs on the machine this names; clients and nodes use the address
        f"SlurmctldHost={socket.gethostname()}({bed.launcher_address})\n"
        f"SlurmctldPort={port}\n"
        f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\nCredType=cred/munge\n"
        "SlurmUser=root\nSlurmdUser=root\n"
        f"StateSaveLocation={spool}\n"
        # %n: each slurmd (one per host, all reading this file) gets files of its own
        f"SlurmdSpoolDir={spool}/slurmd-%n\n"
        f"SlurmctldPidFile={workdir}/slurmctld.pid\nSlurmdPidFile={workdir}/slurmd-%n.pid\n"
        f"SlurmctldLogFile={workdir}/slurmctld.log\nSlurmdLogFile={workdir}/slurmd-%n.log\n"
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
        "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
        "SlurmdParameters=config_overrides\n"
        "MpiDefault=none\nReturnToService=2\n"
        # a cancelled or timed-out job gets SIGTERM, and SIGKILL this much later
        "KillWait=2\n"
        "InactiveLimit=0\n"
        # sbatch --wait checks its job every 2 s only while that is under half of MinJobAge (else
        # every 8, then 32 s); and a batch job starts within a second, not three
        "MinJobAge=4\nSchedulerParameters=batch_sched_delay=0,sched_min_interval=0\n"
        + nodes
        + "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
    )
    # slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc and task/none, and its
    # autodetection fails on a v1 hierarchy under a tmpfs: say which it is, and that there is no
    # systemd to ask (v2 is chosen on a unified hierarchy, but was not tried on one)
    version = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    (workdir / "cgroup.conf").write_text(
        f"CgroupPlugin=cgroup/{version}\nCgroupMountpoint=/sys/fs/cgroup\nIgnoreSystemd=yes\n"
    )
    return conf


def _die_with_parent() -> None:  # in the child, before exec: the daemon goes when this process dies
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip


def _stop(daemons: list[subprocess.Popen[bytes]]) -> None:
    for daemon in daemons:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGTERM)
    for daemon in daemons:
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(5)


@contextlib.contextmanager
def slurm_cluster(workdir: Path, n: int = 2, boot_timeout: float = 30) -> Iterator[SlurmCluster]:
    """A cluster of `n` nodes (hosts of a new multi-host bed) in `workdir`; all gone afterwards."""
    prerequisites()
    workdir.mkdir(parents=True, exist_ok=True)
    with testbed(workdir / "hosts", n=n) as bed:
        daemons: dict[str, subprocess.Popen[bytes]] = {}
        try:
            munge_key, munge_socket = workdir / "munge.key", workdir / "munge.socket"
            munge_key.write_bytes(os.urandom(1024))
            munge_key.chmod(0o400)
            daemons["munged"] = _start(
                ["munged", "--foreground", "--force", f"--key-file={munge_key}", f"--socket={munge_socket}",
                 f"--pid-file={workdir}/munged.pid", f"--log-file={workdir}/munged.log",
                 f"--seed-file={workdir}/munged.seed"],
                workdir / "munged.out", dict(os.environ),
            )  # fmt: skip
            conf = _config(workdir, bed, _free_port(bed.launcher_address), munge_socket)
            env = {**os.environ, "SLURM_CONF": str(conf)}
            daemons["slurmctld"] = _start(["slurmctld", "-D", "-i", "-f", str(conf)], workdir / "slurmctld.out", env)
            for host in bed.hosts:
                assert host.sshd is not None
                (workdir / "spool" / f"slurmd-{host.alias}").mkdir(exist_ok=True)
                # the sshd's namespaces are the host: its network, its hostname, its /etc/hosts
                daemons[host.alias] = _start(
                    ["nsenter", f"--target={host.sshd.pid}", "--net", "--uts", "--mount",
                     "slurmd", "-D", "-N", host.alias, "-f", str(conf)],
                    workdir / f"slurmd-{host.alias}.out", env,
                )  # fmt: skip
            cluster = SlurmCluster(bed, workdir, conf, env, daemons)
            cluster.wait_idle(boot_timeout)
            yield cluster
        finally:
            _stop(list(daemons.values()))
