"""The packages stand on their own: trx-core installs and launches with torch and cloudpickle
only, given an executor of the embedding framework's own."""

from __future__ import annotations

import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EMBEDDING_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, signal, subprocess, sys
    import trx_core

    for absent in ("paramiko", "structlog", "trx_remote", "trx_logging", "torchrunx"):
        assert importlib.util.find_spec(absent) is None, f"{absent} is installed"

    class Agent:  # what a framework's executor hands back for each agent it starts
        def __init__(self, spec):
            self.popen = subprocess.Popen([spec.python, *spec.args], cwd=spec.cwd, env={**os.environ, **spec.env},
                                          stdin=subprocess.PIPE, start_new_session=True)
            self.popen.stdin.write(spec.stdin)
            self.popen.stdin.close()
            self.pidfd = os.pidfd_open(self.popen.pid)
        def fileno(self):
            return self.pidfd
        def poll(self):
            return None if self.popen.poll() is None else f"exit status {self.popen.returncode}"
        def stop(self):
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    class Executor:
        def __init__(self, launcher):
            pass
        def launcher_address(self, hostname):
            return "127.0.0.1"
        def start(self, spec):
            return Agent(spec)

    def rank_times_ten():
        import torch.distributed as dist
        return dist.get_rank() * 10

    trx_core.register_executor("embedded", Executor)
    results = trx_core.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=None,
                                executor="embedded").run(rank_times_ten)
    print(dict(results))
    """
)


@pytest.mark.slow
def test_trx_core_runs_with_only_torch_and_cloudpickle_and_an_executor_of_its_own(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*install, "torch==2.13.0", str(ROOT / "packages" / "trx-core")], check=True, timeout=600)
    listed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    assert "paramiko" not in listed and "structlog" not in listed and "cloudpickle" in listed

    script = tmp_path / "embed.py"
    script.write_text(EMBEDDING_SCRIPT)
    out = subprocess.run([str(python), str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "{0: 0, 1: 10}"
    # without trx-logging, agent 0's records still reach the console
    assert "[localhost agent] started worker rank 0" in out.stdout


def test_the_meta_package_only_composes_and_re_exports() -> None:
    import torchrunx
    import trx_core
    import trx_logging

    for name in torchrunx.__all__:
        assert getattr(torchrunx, name) in (getattr(trx_core, name, None), getattr(trx_logging, name, None))
    src = ROOT / "packages" / "torchrunx" / "src" / "torchrunx"
    assert sorted(p.name for p in src.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]
