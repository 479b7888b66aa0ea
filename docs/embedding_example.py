"""trx-core inside a framework of one's own: an executor that starts each agent as a local
process. The "Embedding trx-core" page includes this file and shows its output.

    python docs/embedding_example.py

Needs only trx-core (torch and cloudpickle); works the same with the full torchrunx installed.
"""

from __future__ import annotations

import os
import signal
import subprocess

import trx_core


class LocalAgent:
    """One agent, as a child process in a session of its own."""

    def __init__(self, spec: trx_core.AgentSpec) -> None:
        if spec.env_file is not None:
            raise trx_core.ConfigurationError("this executor does not support env_file")
        self._popen = subprocess.Popen(
            [spec.python, *spec.args],
            cwd=spec.cwd,
            env={**os.environ, **spec.env},
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        self._pidfd = os.pidfd_open(self._popen.pid)  # readable once the agent has ended
        assert self._popen.stdin is not None
        self._popen.stdin.write(spec.stdin)  # the run's secret: through stdin, never argv
        self._popen.stdin.close()

    def fileno(self) -> int:
        return self._pidfd

    def poll(self) -> str | None:
        code = self._popen.poll()
        return None if code is None else f"the agent exited with status {code}"

    def stop(self) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)  # the agent stops its workers, then exits
            try:
                self._popen.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self._popen.pid, signal.SIGKILL)
                self._popen.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class LocalOnlyExecutor:
    """Every host is this machine: good for a framework that only runs on one node."""

    def __init__(self, settings: trx_core.ExecutorSettings) -> None:
        self.settings = settings  # what an executor may know of the launch (e.g. ssh_config_file)

    def launcher_address(self, hostname: str) -> str:
        return "127.0.0.1"

    def start(self, spec: trx_core.AgentSpec) -> LocalAgent:
        return LocalAgent(spec)


def rank_times_ten() -> int:
    import torch.distributed as dist

    return dist.get_rank() * 10


if __name__ == "__main__":
    trx_core.register_executor("local-only", LocalOnlyExecutor)
    launcher = trx_core.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=None, log_console=None, executor="local-only"
    )
    print(dict(launcher.run(rank_times_ten)))
