"""Node executors: `LocalExecutor` for this machine, `AutoExecutor` choosing per host."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from typing import TYPE_CHECKING

from trx_core import AgentProcess, AgentSpec, ConfigurationError, ExecutorSettings
from trx_core.processes import kill_session

from .command import agent_argv, agent_mark, describe_end, load_script
from .hosts import is_local_host

if TYPE_CHECKING:
    from trx_core import NodeExecutor

    from .srun import SrunExecutor

__all__ = ["AutoExecutor", "LocalAgentProcess", "LocalExecutor"]

# Variables a login shell would have; everything else reaches the agent only through env_vars.
_BASE_ENV = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM")
_STOP_WAIT_S = 2.0
_REAPER_SCRIPT = load_script("local_reaper.sh")


class LocalAgentProcess:
    """An agent running on this machine, in a session of its own, every process of it marked
    (`trx_remote.command.AGENT_MARK_VAR`).

    Until the agent runs Python, a reaper (``scripts/local_reaper.sh``) waits next to it, and
    kills every marked process if its stdin closes: when the launcher dies (the kernel closes
    it), e.g. while the host's ``env_file`` still runs, or when `stop` closes it. From then on
    the agent itself stops everything when the launcher goes.
    """

    def __init__(self, spec: AgentSpec) -> None:
        env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
        env.setdefault("PATH", os.defpath)
        env.update(spec.env)
        self._mark = agent_mark()
        env[self._mark[0]] = self._mark[1]
        self._python = spec.python
        self._reaper = _start_reaper(self._mark)
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        try:
            self._popen = subprocess.Popen(
                agent_argv(spec),
                stdin=subprocess.PIPE,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in the launcher's terminal is the launcher's to handle
            )
        except BaseException:
            _stop_reaper(self._reaper)
            self._output.close()
            raise
        self._pidfd = os.pidfd_open(self._popen.pid)
        _tell_reaper(self._reaper, f"{self._popen.pid}\n")
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write(spec.stdin)
            self._popen.stdin.close()
        except BrokenPipeError:
            pass  # it died already; poll() says how

    def fileno(self) -> int:
        return self._pidfd

    def poll(self) -> str | None:
        code = self._popen.poll()
        if code is None:
            return None
        self._output.seek(0)
        return describe_end(code, self._output.read()[-4000:].decode("utf-8", "replace"), self._python)

    def stop(self) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)  # the agent kills its workers, then exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(_STOP_WAIT_S)
        # Whatever is left, e.g. after the agent was SIGKILLed: in its session, or marked (a
        # worker's child that left the session). Again if something was, for what it forked meanwhile.
        if kill_session(self._popen.pid, self._mark):
            kill_session(self._popen.pid, self._mark)
        self._popen.wait()
        _stop_reaper(self._reaper)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._output.close()


def _start_reaper(mark: tuple[str, str]) -> subprocess.Popen[bytes]:
    # Its own session (Ctrl-C is the launcher's), the launcher's environment: not the mark,
    # or it would kill itself.
    reaper = subprocess.Popen(
        ["bash", "-c", _REAPER_SCRIPT, "torchrunx-reaper"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _tell_reaper(reaper, f"{mark[0]}={mark[1]}\n")
    return reaper


def _tell_reaper(reaper: subprocess.Popen[bytes], line: str) -> None:
    assert reaper.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it is gone already: the agent runs Python
        reaper.stdin.write(line.encode())
        reaper.stdin.flush()


def _stop_reaper(reaper: subprocess.Popen[bytes]) -> None:
    assert reaper.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        reaper.stdin.close()  # if it still waits, its sweep finds nothing left by now
    try:
        reaper.wait(_STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()


class LocalExecutor:
    """Starts agents as child processes of the launcher. Only for this machine.

    It takes `settings` as every executor factory does, and needs none of them.
    """

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        pass

    def launcher_address(self, hostname: str) -> str:
        return "127.0.0.1"

    def start(self, spec: AgentSpec) -> AgentProcess:
        return LocalAgentProcess(spec)


class AutoExecutor:
    """Per host: local for this machine's own names and addresses; inside a SLURM job
    (``SLURM_JOB_ID`` set and ``srun`` on PATH), a job step (`trx_remote.srun.SrunExecutor`) for
    every other node of the job; SSH for every other host.

    The launcher's own node is local even inside a job: the agent is then a child of the
    launcher, so in the launcher's step (the batch script's, under sbatch), accounted to the
    job and ended with it, without the cost of a step of its own.
    """

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        self._settings = settings or ExecutorSettings()
        self._local = LocalExecutor(self._settings)
        self._local_name = ""  # the one hostname of this run that is this machine
        self._local_lock = threading.Lock()
        # Built on first use (paramiko is imported only if needed; the job's nodes are asked
        # from the controller only for a host that is not this machine), from parallel start()s.
        self._lock = threading.Lock()
        self._ssh: NodeExecutor | None = None
        self._srun: SrunExecutor | None = None
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
        self._in_job = bool(job) and shutil.which("srun") is not None

    def _for(self, hostname: str) -> NodeExecutor:
        if is_local_host(hostname):
            self._one_name_for_this_machine(hostname)
            return self._local
        with self._lock:
            if self._in_job:
                if self._srun is None:
                    from .srun import SrunExecutor

                    self._srun = SrunExecutor(self._settings)
                try:
                    in_job = hostname in self._srun.nodes()
                except ConfigurationError as e:
                    # SLURM_JOB_ID set, but no controller knows the job (set by hand, a stale
                    # variable): "auto" reaches the host over SSH; executor="slurm" would refuse.
                    warnings.warn(f"torchrunx: not starting agents as SLURM job steps ({e}); using SSH", stacklevel=2)
                    self._in_job = False
                    in_job = False
                if in_job:
                    return self._srun
            if self._ssh is None:
                from .ssh import SSHExecutor

                self._ssh = SSHExecutor(self._settings)
            return self._ssh

    def _one_name_for_this_machine(self, hostname: str) -> None:
        """Two names of this machine (``localhost`` and ``127.0.0.1``) would start two agents
        here, whose workers have the same local ranks, so the same GPUs: refused."""
        with self._local_lock:
            first = self._local_name = self._local_name or hostname
        if first != hostname:
            raise ConfigurationError(
                f"hostnames {first!r} and {hostname!r} both name this machine: two agents on one machine would "
                "give their workers the same local ranks (and GPUs). List it once, with workers_per_host for more "
                "workers; to run several agents on this machine on purpose, use executor='local'"
            )

    def launcher_address(self, hostname: str) -> str:
        return self._for(hostname).launcher_address(hostname)

    def start(self, spec: AgentSpec) -> AgentProcess:
        return self._for(spec.hostname).start(spec)
