"""Configuration: mistakes are refused before any process starts, the command line covers
every field, and the launcher's environment reaches the workers as configured."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from trx_core.launcher import check_numpy_torch_versions


def noop() -> None:
    pass


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hostnames": []}, "hostnames is empty"),
        ({"hostnames": "node1"}, "pass a list of hostnames"),
        ({"hostnames": ["localhost", "localhost"]}, "more than once"),
        ({"workers_per_host": 0}, "positive whole numbers"),
        ({"workers_per_host": -2}, "positive whole numbers"),
        ({"workers_per_host": "many"}, "'auto', 'gpu' or 'cpu'"),
        ({"hostnames": ["localhost", "127.0.0.1"], "workers_per_host": [1, 2, 3]}, "3 entries but hostnames has 2"),
        ({"backend": "tcp"}, "unknown backend 'tcp'"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"env_vars": "PATH"}, "tuple of patterns"),
        ({"env_file": "/nonexistent/env.sh"}, "env_file '/nonexistent/env.sh' does not exist"),
        ({"executor": "carrier-pigeon"}, "unknown executor 'carrier-pigeon'"),
        ({"no_such_field": 1}, "valid fields are those of torchrunx.Launcher"),
    ],
)
def test_configuration_mistakes_are_refused_before_any_process_starts(
    tmp_path: Path, tag: str, fields: dict[str, Any], message: str
) -> None:
    from conftest import processes_with_tag

    settings: dict[str, Any] = {"hostnames": ["localhost"], "logs": tmp_path / "logs", **fields}
    with pytest.raises(trx.ConfigurationError, match=message):
        trx.launch(noop, **settings)
    assert not processes_with_tag(tag) and not (tmp_path / "logs").exists()


def test_a_function_that_cannot_be_pickled_is_refused_naming_it(tmp_path: Path) -> None:
    lock = threading.Lock()
    with pytest.raises(trx.ConfigurationError, match=r"cannot send .*lambda.* must be picklable"):
        trx.launch(lambda: lock.locked(), hostnames=["localhost"], logs=tmp_path)


def test_arguments_that_cannot_be_pickled_are_refused(tmp_path: Path) -> None:
    with pytest.raises(trx.ConfigurationError, match="cannot send 'noop' and its arguments"):
        trx.launch(noop, {"lock": threading.Lock()}, hostnames=["localhost"], logs=tmp_path)


def test_numpy_2_with_torch_before_2_3_is_refused_with_the_fix() -> None:
    with pytest.raises(trx.ConfigurationError, match=r"NumPy 2\.1\.0 needs torch >= 2\.3.*numpy<2"):
        check_numpy_torch_versions("2.1.0", "2.2.2+cpu")
    check_numpy_torch_versions("2.1.0", "2.3.0")
    check_numpy_torch_versions("1.26.4", "2.0.1")
    check_numpy_torch_versions()  # the pair installed here is a good one


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import tyro, torchrunx; print(repr(tyro.cli(torchrunx.Launcher)))"
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)


def test_tyro_help_lists_every_launcher_field_with_its_documentation() -> None:
    from dataclasses import fields

    help_text = run_cli("--help").stdout
    for field in fields(trx.Launcher):
        assert f"--{field.name.replace('_', '-')}" in help_text
    assert "fnmatch" in help_text and "sources on every host" in help_text


def test_tyro_parses_every_kind_of_launcher_field() -> None:
    out = run_cli(
        "--hostnames", "node1", "node2", "--workers-per-host", "2", "3", "--backend", "None",
        "--logs", "None", "--env-vars", "FOO*", "BAR", "--env-file", "env.sh", "--timeout", "30",
        "--executor", "ssh", "--ssh-config-file", "ssh.conf", "--launcher-address", "10.0.0.1",
    ).stdout  # fmt: skip
    assert out.strip() == repr(
        trx.Launcher(
            hostnames=["node1", "node2"], workers_per_host=[2, 3], backend=None, logs=None,
            env_vars=("FOO*", "BAR"), env_file=Path("env.sh"), timeout=30, executor="ssh",
            ssh_config_file=Path("ssh.conf"), launcher_address="10.0.0.1",
        )
    )  # fmt: skip


def read_env(*names: str) -> dict[str, str | None]:
    return {n: os.environ.get(n) for n in names}


def test_env_vars_patterns_choose_which_launcher_variables_reach_the_workers(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    tricky = "spaces and 'quotes' \"double\" $HOME `date` \\ back\nnew line ünïcode"
    monkeypatch.setenv("MYAPP_TRICKY", tricky)
    monkeypatch.setenv("MYAPP_PLAIN", "1")
    monkeypatch.setenv("OTHER_SECRET", "must not travel")
    got = trx.launch(
        read_env, func_args=["MYAPP_TRICKY", "MYAPP_PLAIN", "OTHER_SECRET"], env_vars=("MYAPP_*",), **local
    )[0]
    assert got == {"MYAPP_TRICKY": tricky, "MYAPP_PLAIN": "1", "OTHER_SECRET": None}


def test_default_env_vars_forward_python_and_torch_settings(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_SHOW_CPP_STACKTRACES", "1")
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")
    got = trx.launch(read_env, func_args=["TORCH_SHOW_CPP_STACKTRACES", "UNRELATED_VARIABLE", "PATH"], **local)[0]
    assert got == {"TORCH_SHOW_CPP_STACKTRACES": "1", "UNRELATED_VARIABLE": None, "PATH": os.environ["PATH"]}


def test_env_file_is_sourced_by_bash_before_the_agent_and_may_compute_values(
    local: dict[str, Any], tmp_path: Path
) -> None:
    env_file = tmp_path / "env.sh"
    env_file.write_text(
        'parts=(node "$(hostname)")\n'  # a bash array: sh could not source this
        'export NODE_LABEL="${parts[0]}-${parts[1]}"\n'
        "[[ -n $NODE_LABEL ]] && export FROM_ENV_FILE=yes\n"
    )
    got = trx.launch(read_env, func_args=["NODE_LABEL", "FROM_ENV_FILE"], env_file=env_file, **local)[0]
    assert got == {"NODE_LABEL": f"node-{os.uname().nodename}", "FROM_ENV_FILE": "yes"}


def test_a_failing_env_file_is_reported_quickly_naming_the_file(local: dict[str, Any], tmp_path: Path) -> None:
    env_file = tmp_path / "broken.sh"
    env_file.write_text("echo about to fail >&2\nfalse\n")  # the status of source is the last command's
    start = time.monotonic()
    with pytest.raises(trx.AgentFailedError, match=f"env_file {env_file} failed") as info:
        trx.launch(noop, env_file=env_file, **local)
    assert time.monotonic() - start < 5
    assert "about to fail" in str(info.value) and info.value.hostname == "localhost"


def test_backend_nccl_on_a_host_without_gpus_is_refused_before_workers_start(local: dict[str, Any]) -> None:
    local["backend"] = "nccl"
    with pytest.raises(trx.ConfigurationError, match="backend='nccl' needs CUDA GPUs, but host 'localhost' has none"):
        trx.launch(noop, **local)
    assert not list(Path(local["logs"]).glob("*.log"))  # no worker was started


def test_an_env_vars_pattern_that_matches_nothing_is_a_warning_not_an_error(local: dict[str, Any]) -> None:
    with pytest.warns(UserWarning, match="pattern 'MYAPP_TYPO\\*' matches no variable"):
        trx.launch(noop, env_vars=(*trx.DEFAULT_ENV_VARS, "MYAPP_TYPO*"), **local)


def test_an_env_file_that_is_a_folder_is_refused(local: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(trx.ConfigurationError, match="does not exist or is not a file"):
        trx.launch(noop, env_file=tmp_path, **local)
