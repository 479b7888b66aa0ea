"""trx-remote on this machine alone: SLURM discovery, ssh config reading, host classification,
and executors plugged in through the ``torchrunx.executors`` entry-point group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tyro

import torchrunx as trx
from trx_core import AgentSpec, available_executors
from trx_core.plan import plan_hosts
from trx_remote.addresses import route_source_address
from trx_remote.hosts import is_local_host
from trx_remote.slurm import expand_counts, expand_hostlist, slurm_hostnames, slurm_workers_per_host
from trx_remote.ssh import _environment_block, _remote_command, load_ssh_config, ssh_host


@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- SLURM
@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("gpu-[01-04,07],cpu1", ["gpu-01", "gpu-02", "gpu-03", "gpu-04", "gpu-07", "cpu1"]),
        ("node7", ["node7"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("x[098-100]", ["x098", "x099", "x100"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("a[1,3],b-[2-3].lan", ["a1", "a3", "b-2.lan", "b-3.lan"]),
    ],
)
def test_compressed_slurm_hostlists_expand_in_slurms_order(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["gpu-[01-", "gpu-[4-2]", "a]", "b[x-y]"])
def test_a_malformed_nodelist_is_a_configuration_error_quoting_it(hostlist: str, no_slurm: None) -> None:
    with pytest.raises(trx.ConfigurationError, match="cannot read SLURM_JOB_NODELIST"):
        slurm_hostnames({"SLURM_JOB_NODELIST": hostlist, "PATH": ""})


def test_slurm_per_node_counts_expand() -> None:
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]


def test_scontrol_is_asked_first_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "from-scontrol-%s\\n" a b\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert slurm_hostnames({"SLURM_JOB_NODELIST": "n[1-2]"}) == ["from-scontrol-a", "from-scontrol-b"]


@pytest.mark.parametrize(
    ("environ", "counts"),
    [
        ({"SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x3)"}, [4, 4, 4]),
        ({"SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "3,2(x2)"}, [3, 2, 2]),
        ({"SLURM_TASKS_PER_NODE": "1(x3)", "SLURM_GPUS_ON_NODE": "8"}, [8, 8, 8]),
        ({"SLURM_TASKS_PER_NODE": "1(x3)", "SLURM_GPUS_PER_NODE": "a100:2"}, [2, 2, 2]),
        ({"SLURM_TASKS_PER_NODE": "1(x3)"}, None),  # SLURM's default: let each host say (GPUs, or 1)
    ],
    ids=["ntasks-per-node", "ntasks", "gpus-on-node", "typed-gpus-per-node", "nothing-asked"],
)
def test_workers_per_host_come_from_the_tasks_then_the_gpus_asked_for(
    environ: dict[str, str], counts: list[int] | None
) -> None:
    base = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_NUM_NODES": "3", "PATH": ""}
    assert slurm_workers_per_host({**base, **environ}) == counts


def test_slurm_allotment_is_used_only_for_auto_workers_on_discovered_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "3")
    monkeypatch.setenv("PATH", "")  # no scontrol
    discovered = plan_hosts("auto", "auto")
    assert list(discovered.hostnames) == ["n1", "n2"]
    assert list(discovered.workers_per_host) == [3, 3]  # type: ignore[arg-type]
    listed = plan_hosts(["n1", "n2"], "auto")  # the user's own list: SLURM's counts may not fit it
    assert listed.workers_per_host == "auto"
    explicit = plan_hosts("slurm", 2)
    assert explicit.workers_per_host == 2


def test_hostnames_slurm_outside_an_allocation_says_so_before_starting_anything(no_slurm: None) -> None:
    with pytest.raises(trx.ConfigurationError, match="not inside a SLURM allocation"):
        trx.launch(os.getpid, hostnames="slurm", backend=None, logs=None)


# --------------------------------------------------------------------------- ssh config
def test_ssh_config_options_are_read_as_openssh_would(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        textwrap.dedent(
            """\
            Host gpu1
                HostName 10.1.2.3
                Port 2200
                ProxyJump admin@bastion:2022
            Host gpu*
                User alice
                IdentityFile ~/.ssh/cluster_key
                IdentitiesOnly yes
                ConnectTimeout 7
                StrictHostKeyChecking accept-new
                UserKnownHostsFile ~/.ssh/cluster_known_hosts
            """
        )
    )
    host = ssh_host(load_ssh_config(config), "gpu1")
    home = os.path.expanduser("~")
    assert (host.hostname, host.port, host.user, host.proxy_jump) == (
        "10.1.2.3",
        2200,
        "alice",
        ("admin@bastion:2022",),
    )
    assert host.identity_files == (f"{home}/.ssh/cluster_key",) and host.identities_only
    assert (host.connect_timeout, host.strict_host_key_checking) == (7.0, "accept-new")
    assert host.known_hosts_files[0] == f"{home}/.ssh/cluster_known_hosts"
    other = ssh_host(load_ssh_config(config), "elsewhere")  # nothing set: OpenSSH's defaults
    assert (other.hostname, other.port, other.strict_host_key_checking) == ("elsewhere", 22, "yes")


def test_a_missing_ssh_config_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(trx.ConfigurationError, match="does not exist"):
        load_ssh_config(tmp_path / "nope")


# --------------------------------------------------------------------------- hosts
def test_this_machines_names_and_addresses_are_local_and_others_are_not() -> None:
    own_address = route_source_address("192.0.2.1")  # TEST-NET-1: the address on our default route
    for name in ("localhost", "127.0.0.1", socket.gethostname(), own_address):
        assert is_local_host(name), name
    for name in ("no-such-host.invalid", "192.0.2.1" if own_address != "192.0.2.1" else "198.51.100.7"):
        assert not is_local_host(name), name


# --------------------------------------------------------------------------- executor plugins
PLUGIN = '''
from pathlib import Path
from trx_remote import LocalExecutor

class RecordingExecutor(LocalExecutor):
    """Starts agents like LocalExecutor, and notes each host it starts one on."""

    def start(self, spec):
        with open(Path(spec.cwd, "started-by-plugin"), "a") as f:
            f.write(spec.hostname + "\\n")
        return super().start(spec)
'''


def test_an_executor_installed_as_an_entry_point_is_selectable_by_name_also_from_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "recording_executor-1.0.dist-info").mkdir(parents=True)
    (site / "recording_executor-1.0.dist-info" / "METADATA").write_text("Name: recording-executor\nVersion: 1.0\n")
    (site / "recording_executor-1.0.dist-info" / "entry_points.txt").write_text(
        "[torchrunx.executors]\nrecording = recording_executor:RecordingExecutor\n"
    )
    (site / "recording_executor.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(tmp_path)
    assert "recording" in available_executors()

    args = ["--hostnames", "localhost", "--executor", "recording", "--backend", "None", "--logs", "None"]
    launcher: Any = tyro.cli(trx.Launcher, args=args)
    assert launcher.executor == "recording"
    assert launcher.run(os.getcwd)[0] == str(tmp_path)
    assert (tmp_path / "started-by-plugin").read_text() == "localhost\n"


def test_an_unknown_executor_name_lists_the_installed_ones(no_slurm: None) -> None:
    with pytest.raises(trx.ConfigurationError, match=r"unknown executor 'nope' \(available: auto, local, .*ssh"):
        trx.launch(os.getpid, hostnames=["localhost"], executor="nope", backend=None, logs=None)


def test_executor_local_is_used_for_every_host_when_forced() -> None:
    results = trx.launch(socket.gethostname, hostnames=["not-this-machine"], executor="local", backend=None, logs=None)
    assert results[0] == socket.gethostname()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Host node1\n    HostName\n", "cannot parse ssh_config_file .*Unparsable line HostName"),
        ("Host node1\n    Port abc\n", "ssh config for host 'node1': invalid literal .* 'abc'"),
    ],
)
def test_a_malformed_ssh_config_file_is_a_configuration_error_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(text)
    with pytest.raises(trx.ConfigurationError, match=message):
        trx.launch(print, hostnames=["node1"], ssh_config_file=config, logs=None)


# --------------------------------------------------------------------------- the remote command
SHOW_ENV_AND_STDIN = "import os, sys; print(repr(({k: os.environ.get(k) for k in sys.argv[1:]}, sys.stdin.read())))"


def test_the_ssh_command_line_holds_no_value_and_the_environment_arrives_through_stdin_byte_for_byte(
    tmp_path: Path,
) -> None:
    env = {
        "TRX_SPACES": "  two  spaces and a\ttab ",
        "TRX_SHELL": "$HOME `id` $(touch /tmp/trx-pwned) '; exit 1; echo '\\",
        "TRX_NEWLINES": "line 1\nline 2\n\n",
        "TRX_NOT_UTF8": b"\xff\xfe raw".decode("utf-8", "surrogateescape"),
        "TRX_EMPTY": "",
    }
    spec = AgentSpec(
        hostname="somewhere",
        python=sys.executable,
        args=("-c", SHOW_ENV_AND_STDIN, *env),
        cwd=str(tmp_path),
        env=env,
        env_file=None,
        stdin=b"the-run-secret\n",
    )
    command = _remote_command(spec)
    assert not any(value in command for value in env.values() if len(value) > 1)
    # run here as the host's login shell would run it, from an environment without those variables
    done = subprocess.run(
        ["bash", "-c", command],
        input=_environment_block(env, spec.hostname) + spec.stdin,
        capture_output=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert done.returncode == 0, done.stderr
    session_line, shown = done.stdout.decode("utf-8", "surrogateescape").split("\n", 1)
    assert session_line.startswith("torchrunx-agent-session ")
    seen, rest_of_stdin = eval(shown)  # the repr printed by SHOW_ENV_AND_STDIN
    assert seen == env
    assert rest_of_stdin == "the-run-secret\n"  # left for the agent


@pytest.mark.parametrize("name", ["NOT.A.NAME", "1ST", "UID"])  # UID: read-only in bash
def test_a_variable_that_bash_cannot_export_is_not_sent_and_says_so(name: str) -> None:
    with pytest.warns(UserWarning, match=f"{name!r} is not sent to host 'h1': bash cannot export it"):
        block = _environment_block({name: "x", "OK": "y"}, "h1")
    assert block == b"OK=y\0\0"
