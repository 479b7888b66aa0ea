"""The srun executor: inside a SLURM allocation, each agent is a job step on its host.

``Launcher(executor="slurm")`` starts every agent with ``srun`` as a one-task step of the
current job on the agent's node, sharing the job's resources with every other step
(``--overlap``; all of the job's CPUs, memory and GPUs on that node, no CPU binding). The
agents are then part of the job: accounted to it, confined to its resources, and cleaned up
by SLURM when it ends, is cancelled or hits its time limit. No SSH is needed.

The agent runs exactly as with the other executors (the same bash script: ``cd``, ``source
env_file``, ``exec`` the launcher's interpreter): its environment is that of ``srun``, which
passes it on to the step (``--export=ALL``): a few login variables (HOME, USER...), the run's
variables, and ``SLURM_CONF``; no value is put on a command line. The run's secret reaches
the agent on the step's standard input.

The job is the one in ``SLURM_JOB_ID``: the launcher runs inside the allocation (a batch
script, ``salloc``, or a step of the job), or outside it with ``SLURM_JOB_ID`` set by hand
(where ``srun --jobid`` is allowed, as for the job's owner). Hosts must be nodes of that job.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading

from trx_core import AgentFailedError, AgentSpec, ConfigurationError, ExecutorSettings

from .addresses import AddressError, route_source_address
from .command import agent_argv, describe_end, load_script

__all__ = ["SrunAgentProcess", "SrunExecutor"]

# Variables a login shell would have; everything else reaches the agent only through env_vars.
_BASE_ENV = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM")
# What srun itself needs from the launcher's environment to find the cluster. The job's other
# SLURM_* variables are left out on purpose: srun reads many of them as options (SLURM_NTASKS,
# SLURM_CPUS_PER_TASK, SLURM_EXACT, SLURM_EXPORT_ENV...), which would reshape the agent's step.
_SLURM_CLIENT_ENV = ("SLURM_CONF", "SLURM_CLUSTERS")

_EXIT_WAIT_S = 0.5  # the agent was asked to stop over its connection: it usually exits at once
_STOP_WAIT_S = 2.0  # after SIGTERM (the agent kills its workers, then exits), and after the step's cancel
_CLIENT_TIMEOUT_S = 15.0  # for scancel, squeue, scontrol
_TAIL = 4000

# The step's first words: its id after this marker (for `stop`, which cancels it by id).
_STEP_MARKER = "torchrunx-step "
_STEP_SCRIPT = load_script("srun_step.sh")
# Printed by srun when the cluster has no CPU-binding plugin: true, and harmless with --cpu-bind=none.
_NOISE = ("srun: cluster configuration lacks support for cpu binding",)


def _job_id() -> str:
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if not job_id:
        raise ConfigurationError(
            "executor='slurm' starts agents as steps of a SLURM job, but this process is not inside a SLURM "
            "allocation (SLURM_JOB_ID is not set): run the launcher under sbatch, salloc or srun, set "
            "SLURM_JOB_ID to the job to use, or choose executor='ssh'"
        )
    return job_id


class SrunExecutor:
    """Starts each agent as a one-task ``srun`` step of the current SLURM job, on its host."""

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        # `settings`, as every executor factory gets them: none applies to job steps.
        self.job_id = _job_id()
        srun = shutil.which("srun")
        if srun is None:
            raise ConfigurationError(
                "executor='slurm' needs SLURM's `srun` command, which is not on PATH: load SLURM's environment "
                "(e.g. `module load slurm`), or choose executor='ssh'"
            )
        self.srun = srun
        env = {name: os.environ[name] for name in _BASE_ENV + _SLURM_CLIENT_ENV if name in os.environ}
        env.setdefault("PATH", os.environ.get("PATH", os.defpath))
        self._client_env = env  # for srun, scancel and squeue
        self._nodes: list[str] | None = None
        self._nodes_lock = threading.Lock()

    def nodes(self) -> list[str]:
        """The nodes of the job, as the controller says (asked once)."""
        with self._nodes_lock:
            if self._nodes is None:
                self._nodes = _job_nodes(self.job_id, self._client_env)
            return self._nodes

    def _check_node(self, hostname: str) -> None:
        nodes = self.nodes()
        if hostname not in nodes:
            raise ConfigurationError(
                f"host {hostname!r} is not a node of SLURM job {self.job_id} (its nodes: {', '.join(nodes)}): "
                "executor='slurm' can only start agents on the job's own nodes; use hostnames='slurm', or "
                "executor='ssh' for hosts outside the job"
            )

    def launcher_address(self, hostname: str) -> str:
        """This machine's address on the route to `hostname` (which must be a node of the job)."""
        self._check_node(hostname)
        try:
            return route_source_address(hostname)
        except AddressError as e:
            raise AgentFailedError(
                hostname, f"{e}. Set Launcher.launcher_address to the address at which this host reaches the launcher"
            ) from None

    def start(self, spec: AgentSpec) -> SrunAgentProcess:
        """Start the agent of `spec` as a job step on its host; returns at once (srun starts it)."""
        self._check_node(spec.hostname)
        env = dict(self._client_env)
        env.update(spec.env)  # srun exports its whole environment to the step
        return SrunAgentProcess(self.srun, self.job_id, spec, env)


def _job_nodes(job_id: str, env: dict[str, str]) -> list[str]:
    """The nodes of `job_id`, expanded, from the controller (right even inside a step of the job,
    where ``SLURM_JOB_NODELIST`` may be the step's nodes)."""
    squeue = shutil.which("squeue", path=env.get("PATH"))
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if squeue is None or scontrol is None:
        raise ConfigurationError("executor='slurm' needs SLURM's `squeue` and `scontrol` commands on PATH")
    try:
        asked = subprocess.run(
            [squeue, "-h", "-j", job_id, "-o", "%N"], env=env, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise ConfigurationError(f"the SLURM controller did not answer within {_CLIENT_TIMEOUT_S:g} s") from None
    nodelist = asked.stdout.strip()
    if asked.returncode != 0 or not nodelist:
        why = asked.stderr.strip() or "it is not running"
        raise ConfigurationError(f"cannot find the nodes of SLURM job {job_id}: {why}")
    expanded = subprocess.run(
        [scontrol, "show", "hostnames", nodelist], env=env, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S
    )
    if expanded.returncode != 0:
        raise ConfigurationError(f"cannot expand the node list {nodelist!r} of SLURM job {job_id}: {expanded.stderr}")
    return expanded.stdout.split()


class SrunAgentProcess:
    """An agent running as a job step; `stop` cancels the step, so nothing of it survives."""

    def __init__(self, srun: str, job_id: str, spec: AgentSpec, env: dict[str, str]) -> None:
        self.hostname = spec.hostname
        self.job_id = job_id
        self._srun = srun
        self._env = env
        self._python = spec.python
        self._name = f"torchrunx-agent-{secrets.token_hex(6)}"  # finds the step when its id is not known yet
        self._step: str | None = None
        self._end: str | None = None
        self._lock = threading.Lock()
        self._stopped = False
        argv = [
            srun, f"--jobid={job_id}", f"--job-name={self._name}",
            "--nodes=1", "--ntasks=1", f"--nodelist={spec.hostname}",
            # all of the job's resources on the node, shared with its other steps (also the
            # launcher's own, when it runs in one); no binding of the agent to one CPU
            "--overlap", "--mem=0", "--cpu-bind=none",
            "--kill-on-bad-exit=1", "--export=ALL", "--quiet",
            "bash", "-c", _STEP_SCRIPT, "torchrunx-step", *agent_argv(spec),
        ]  # fmt: skip
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in the launcher's terminal is the launcher's to handle
        )
        self._pidfd = os.pidfd_open(self._popen.pid)
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write(spec.stdin)  # srun forwards it to the step's task
            self._popen.stdin.close()
        except BrokenPipeError:
            pass  # srun ended already; poll() says how

    def fileno(self) -> int:
        return self._pidfd

    def _text(self) -> str:
        """srun's output so far (the step's, and its own), read without moving the shared offset."""
        size = os.fstat(self._output.fileno()).st_size
        start = max(0, size - 4 * _TAIL)
        return os.pread(self._output.fileno(), size - start, start).decode("utf-8", "replace")

    def _step_id(self) -> str | None:
        """``JOB.STEP`` of the agent's step: from its first line, else from the controller."""
        if self._step is None:
            match = re.search(rf"^{_STEP_MARKER}(\S+)$", self._text(), re.MULTILINE)
            if match:
                self._step = match[1]
            else:
                self._step = self._find_step()
        return self._step

    def _find_step(self) -> str | None:
        try:
            out = subprocess.run(
                ["squeue", "-h", "-s", "-j", self.job_id, "-o", "%i %j"],
                env=self._env, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return next((line.split()[0] for line in out.splitlines() if line.split()[1:] == [self._name]), None)

    def poll(self) -> str | None:
        if self._end is None and self._popen.poll() is not None:
            self._end = self._describe_end(self._popen.returncode)
        return self._end

    def _describe_end(self, code: int) -> str:
        text = self._text()
        started = _STEP_MARKER in text
        lines = [line for line in text.splitlines() if not line.startswith(_STEP_MARKER) and line not in _NOISE]
        tail = "\n".join(lines)[-_TAIL:]
        if code < 0:
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = str(-code)
            return f"srun, which ran the agent's job step on {self.hostname!r}, was killed by signal {how}" + (
                f": {tail.strip()}" if tail.strip() else ""
            )
        if not started:
            return f"srun could not start the agent as a step of SLURM job {self.job_id} on {self.hostname!r}: " + (
                tail.strip() or f"srun exited with code {code}"
            )
        exited = re.search(r"task 0: Exited with exit code (\d+)", tail)
        if exited:
            code = int(exited[1])
        elif code > 128:  # srun: 128 + the signal that ended the task
            code = -(code - 128)
        return describe_end(code, tail, self._python)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            if not self._wait(_EXIT_WAIT_S):
                step = self._step_id()
                if step is not None:
                    self._scancel("--signal=TERM", step)  # the agent's own clean stop
                    if not self._wait(_STOP_WAIT_S):
                        self._scancel(step)  # SIGKILL to every process of the step
                else:  # no step yet: srun gives up creating it (or kills it, if it just started)
                    self._popen.send_signal(signal.SIGTERM)
                if not self._wait(_STOP_WAIT_S):
                    self._popen.kill()
            self._popen.wait()
            if self._popen.returncode < 0 and (step := self._step_id()) is not None:
                self._scancel(step)  # srun was killed: its step would outlive it
            self.poll()  # while the output can still be read
        finally:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            self._output.close()

    def _wait(self, seconds: float) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(seconds)
            return True
        return False

    def _scancel(self, *args: str) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", "--quiet", *args], env=self._env, capture_output=True, timeout=_CLIENT_TIMEOUT_S)
