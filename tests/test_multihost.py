"""torchrunx across real hosts: two network namespaces, each with its own sshd, hostname and
/etc/hosts (tests/multihost.py), reached over SSH exactly as a user's cluster would be.

Every test checks afterwards that no process of ours is left in any host's namespace.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import torchrunx as trx
from multihost import TestBed, write_ssh_config

pytestmark = pytest.mark.multihost

FAST_FAIL_S = 5.0  # "within the connect timeout plus a few seconds"


@pytest.fixture
def bed(multihost_bed: TestBed) -> Iterator[TestBed]:
    """The session's two hosts; fails the test if any process of it is left on them afterwards."""
    yield multihost_bed
    left = multihost_bed.wait_no_leftovers()
    assert not left, f"processes left on the hosts after the test: {left}"


def on(bed: TestBed, tmp_path: Path, **fields: Any) -> dict[str, Any]:
    """Launcher fields for a run on both hosts of `bed`, overridden by `fields`."""
    return {
        "hostnames": bed.aliases,
        "workers_per_host": 2,
        "ssh_config_file": bed.ssh_config,
        "backend": "gloo",
        "logs": tmp_path / "logs",
        "timeout": 60,
        **fields,
    }


def ssh_config(bed: TestBed, tmp_path: Path, extra: str) -> Path:
    """The bed's ssh config plus the Host entries in `extra`."""
    return write_ssh_config(bed, tmp_path / "ssh_config", textwrap.dedent(extra))


def launch_fails(expected: type[BaseException], func: Any = None, **fields: Any) -> tuple[BaseException, float]:
    """Launch, expect `expected`; return it and how long it took to come."""
    start = time.monotonic()
    with pytest.raises(expected) as info:
        trx.launch(func or whoami, **fields)
    return info.value, time.monotonic() - start


# --------------------------------------------------------------------------- worker functions
def whoami() -> tuple[str, int, int, str]:
    return socket.gethostname(), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), os.environ["MASTER_ADDR"]


def sum_and_gather_hostnames() -> tuple[float, list[str]]:
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    hostnames: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hostnames, socket.gethostname())
    return total.item(), hostnames


def interpreter_and_directory() -> tuple[str, str]:
    return sys.executable, os.getcwd()


def environment_of_interest() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("TRX_")}


def print_where_i_am() -> None:
    print(f"printed by rank {dist.get_rank()} on {socket.gethostname()}", flush=True)


def rank_on_host2_raises() -> None:
    if socket.gethostname() == "host2" and int(os.environ["LOCAL_RANK"]) == 1:
        raise KeyError("missing on host2")
    time.sleep(60)


def rank_on_host2_is_killed() -> None:
    if socket.gethostname() == "host2" and int(os.environ["LOCAL_RANK"]) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def host2_kills_its_agent_after_starting_a_detached_child() -> None:
    if socket.gethostname() == "host2" and int(os.environ["LOCAL_RANK"]) == 0:
        # in a session of its own: only the run's environment marker ties it to the run
        subprocess.Popen(["sleep", "300"], start_new_session=True)
        os.kill(os.getppid(), signal.SIGKILL)  # workers are forked by the agent
    time.sleep(60)


def ssh_client_address() -> str:
    return os.environ["SSH_CONNECTION"].split()[0]  # set by sshd in the agent's session


# --------------------------------------------------------------------------- results
def test_every_rank_on_both_hosts_returns_its_value_with_its_hosts_own_hostname(bed: TestBed, tmp_path: Path) -> None:
    results = trx.launch(whoami, **on(bed, tmp_path))
    a = bed.hosts[0].address  # MASTER_ADDR: host 0, whose agent hosts the rendezvous store (as torchrun's does)
    assert dict(results) == {0: ("host1", 0, 0, a), 1: ("host1", 1, 1, a), 2: ("host2", 2, 0, a), 3: ("host2", 3, 1, a)}
    assert results.index("host2", 1) == ("host2", 3, 1, a)


def test_workers_of_both_hosts_form_one_process_group_and_all_reduce(bed: TestBed, tmp_path: Path) -> None:
    results = trx.launch(sum_and_gather_hostnames, **on(bed, tmp_path))
    assert [results[r] for r in range(4)] == [(10.0, ["host1", "host1", "host2", "host2"])] * 4


def test_agents_run_the_launchers_interpreter_in_its_working_directory(
    bed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    results = trx.launch(interpreter_and_directory, **on(bed, tmp_path, workers_per_host=1, backend=None))
    assert dict(results) == {0: (sys.executable, str(tmp_path)), 1: (sys.executable, str(tmp_path))}


def test_log_files_of_both_hosts_are_written_in_the_launchers_logs_folder(bed: TestBed, tmp_path: Path) -> None:
    trx.launch(print_where_i_am, **on(bed, tmp_path))
    files = {p.name.split("_", 1)[1]: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert sorted(files) == ["host1.log", "host1_0.log", "host1_1.log", "host2.log", "host2_0.log", "host2_1.log"]
    assert "printed by rank 3 on host2" in files["host2_1.log"]
    assert "printed by rank 2 on host2" in files["host2.log"]  # an agent's file holds its worker 0's output


# --------------------------------------------------------------------------- environment
TRICKY_VALUES = {
    "TRX_MATCHED_SPACES": "  two  spaces and a\ttab ",
    "TRX_MATCHED_QUOTES": """it's "quoted" 'twice'""",
    "TRX_MATCHED_DOLLAR": "$HOME ${PATH} $(touch /tmp/trx-pwned) $$",
    "TRX_MATCHED_BACKTICKS": "`touch /tmp/trx-pwned` \\` \\\\",
    "TRX_MATCHED_NEWLINES": "line 1\nline 2\n\n",
    "TRX_MATCHED_UNICODE": "ünïcødé ✓ 日本 🚀",
    "TRX_MATCHED_SHELL": "'; exit 1; echo '",
    "TRX_MATCHED_DASH": "-n",
    "TRX_MATCHED_EMPTY": "",
    "TRX_MATCHED_NOT_UTF8": b"\xff\xfe raw".decode("utf-8", "surrogateescape"),
}


def test_matched_env_vars_arrive_byte_for_byte_and_unmatched_ones_are_not_sent(
    bed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in TRICKY_VALUES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TRX_UNMATCHED", "stays on the launcher")
    fields = on(bed, tmp_path, workers_per_host=1, backend=None, env_vars=("PATH", "TORCH*", "TRX_MATCHED_*"))
    results = trx.launch(environment_of_interest, **fields)
    assert results[0] == TRICKY_VALUES
    assert results[1] == TRICKY_VALUES
    assert not os.path.exists("/tmp/trx-pwned")


def test_env_file_is_sourced_on_every_host_and_can_compute_a_host_specific_value(
    bed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRX_MATCHED_BASE", "/data/it's here")
    env_file = tmp_path / "env.sh"
    env_file.write_text(
        'case "$(hostname)" in host1) shard=0 ;; *) shard=$((6 * 7)) ;; esac\n'
        'export TRX_NODE_VALUE="$(hostname)-shard-$shard"\n'
        'export TRX_DERIVED="$TRX_MATCHED_BASE/sub dir"  # sees the variables sent by the launcher\n'
    )
    fields = on(bed, tmp_path, backend=None, env_vars=("TORCH*", "TRX_MATCHED_*"), env_file=env_file)
    results = trx.launch(environment_of_interest, **fields)
    derived = "/data/it's here/sub dir"
    assert [(r["TRX_NODE_VALUE"], r["TRX_DERIVED"]) for r in (results[i] for i in range(4))] == [
        ("host1-shard-0", derived),
        ("host1-shard-0", derived),
        ("host2-shard-42", derived),
        ("host2-shard-42", derived),
    ]


# --------------------------------------------------------------------------- failures on host 2
def test_worker_exception_on_the_second_host_is_reraised_with_its_type(bed: TestBed, tmp_path: Path) -> None:
    error, elapsed = launch_fails(KeyError, rank_on_host2_raises, **on(bed, tmp_path))
    assert "missing on host2" in str(error)
    assert "host 'host2', rank 3 (local rank 1)" in "".join(getattr(error, "__notes__", []))
    assert elapsed < 30  # peers sleeping 60 s are stopped, not waited for


def test_worker_killed_on_the_second_host_raises_worker_failed_error(bed: TestBed, tmp_path: Path) -> None:
    error, elapsed = launch_fails(trx.WorkerFailedError, rank_on_host2_is_killed, **on(bed, tmp_path))
    assert (error.hostname, error.rank, error.local_rank) == ("host2", 2, 0)  # type: ignore[attr-defined]
    assert "SIGKILL" in str(error)
    assert elapsed < 30


def test_agent_killed_on_the_second_host_raises_agent_failed_error_and_its_whole_tree_is_killed(
    bed: TestBed, tmp_path: Path
) -> None:
    fields = on(bed, tmp_path)
    error, elapsed = launch_fails(trx.AgentFailedError, host2_kills_its_agent_after_starting_a_detached_child, **fields)
    assert error.hostname == "host2"  # type: ignore[attr-defined]
    assert elapsed < 30
    # the bed fixture then checks that the orphaned workers and the detached `sleep` are gone


LAUNCHER_SCRIPT = """\
import os, sys, time, torchrunx as trx
from pathlib import Path

def work(marks: str) -> None:
    Path(marks, os.environ["RANK"]).touch()
    time.sleep(300)

trx.launch(work, {"marks": sys.argv[1]}, hostnames=["host1", "host2"], workers_per_host=2,
           ssh_config_file=sys.argv[2], backend="gloo", logs=None, log_console=None, timeout=60)
"""


def test_killing_the_launcher_leaves_no_process_on_any_host(bed: TestBed, tmp_path: Path) -> None:
    script, marks = tmp_path / "launcher.py", tmp_path / "marks"
    script.write_text(LAUNCHER_SCRIPT)
    marks.mkdir()
    launcher = subprocess.Popen([sys.executable, str(script), str(marks), str(bed.ssh_config)])
    try:
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 4:
            assert launcher.poll() is None and time.monotonic() < deadline, "the workers did not all start"
            time.sleep(0.1)
    finally:
        launcher.kill()
        launcher.wait()
    assert bed.wait_no_leftovers(timeout=10) == {}


# --------------------------------------------------------------------------- errors, fast
def test_unreachable_hosts_fail_within_their_connect_timeout_connected_in_parallel(
    bed: TestBed, tmp_path: Path
) -> None:
    config = ssh_config(
        bed,
        tmp_path,
        f"""
        Host ghost1 ghost2
            HostName {bed.unused_address()}
            ConnectTimeout 2
            StrictHostKeyChecking no
        """,
    )
    fields = on(bed, tmp_path, hostnames=["host1", "ghost1", "ghost2"], ssh_config_file=config)
    error, elapsed = launch_fails(trx.AgentFailedError, **fields)
    assert error.hostname == "ghost1"  # type: ignore[attr-defined]
    assert "ConnectTimeout=2 s" in str(error)
    assert "ghost2" in "".join(getattr(error, "__notes__", []))
    assert elapsed < 2 * 2  # in parallel: one timeout, not the sum of them


def test_a_hostname_that_does_not_resolve_fails_at_once_naming_it(bed: TestBed, tmp_path: Path) -> None:
    fields = on(bed, tmp_path, hostnames=["host1", "no-such-host.invalid"])
    error, elapsed = launch_fails(trx.AgentFailedError, **fields)
    assert error.hostname == "no-such-host.invalid"  # type: ignore[attr-defined]
    assert "cannot resolve 'no-such-host.invalid'" in str(error)
    assert elapsed < FAST_FAIL_S


def test_authentication_failure_names_the_host_user_and_key(bed: TestBed, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    address = bed.hosts[1].address
    config = ssh_config(
        bed,
        tmp_path,
        f"""
        Host stranger
            HostName {address}
            User root
            IdentityFile {stranger}
            IdentitiesOnly yes
            UserKnownHostsFile {bed.known_hosts}
        """,
    )
    error, elapsed = launch_fails(
        trx.AgentFailedError, **on(bed, tmp_path, hostnames=["stranger"], ssh_config_file=config)
    )
    assert error.hostname == "stranger"  # type: ignore[attr-defined]
    assert "authentication failed for user 'root'" in str(error) and str(stranger) in str(error)
    assert elapsed < FAST_FAIL_S


def test_a_host_key_missing_from_known_hosts_is_refused(bed: TestBed, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.touch()
    config = ssh_config(
        bed,
        tmp_path,
        f"""
        Host unknown-key
            HostName {bed.hosts[0].address}
            IdentityFile {bed.client_key}
            UserKnownHostsFile {empty}
            GlobalKnownHostsFile /dev/null
        """,
    )
    fields = on(bed, tmp_path, hostnames=["unknown-key"], ssh_config_file=config)
    error, elapsed = launch_fails(trx.AgentFailedError, **fields)
    assert "host key is not in known_hosts" in str(error) and str(empty) in str(error)
    assert elapsed < FAST_FAIL_S
    assert empty.read_text() == ""  # nothing was trusted behind the user's back


def test_strict_host_key_checking_no_in_the_config_accepts_an_unknown_host_key(bed: TestBed, tmp_path: Path) -> None:
    config = ssh_config(
        bed,
        tmp_path,
        f"""
        Host trusting
            HostName {bed.hosts[1].address}
            IdentityFile {bed.client_key}
            UserKnownHostsFile /dev/null
            StrictHostKeyChecking no
        """,
    )
    fields = on(bed, tmp_path, hostnames=["trusting"], ssh_config_file=config, workers_per_host=1, backend=None)
    assert trx.launch(whoami, **fields)[0][0] == "host2"


def test_a_missing_python_interpreter_on_a_host_is_reported_naming_it(
    bed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/opt/no-such-venv/bin/python")  # the launcher's, sent to the hosts
    error, elapsed = launch_fails(trx.AgentFailedError, **on(bed, tmp_path))
    assert "python interpreter /opt/no-such-venv/bin/python not found on host host" in str(error)
    assert elapsed < FAST_FAIL_S


def test_torchrunx_missing_for_the_hosts_interpreter_is_reported(
    bed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], check=True)
    bare = str(tmp_path / "bare" / "bin" / "python")  # an interpreter without torchrunx
    monkeypatch.setattr(sys, "executable", bare)
    error, elapsed = launch_fails(trx.AgentFailedError, **on(bed, tmp_path))
    assert f"torchrunx is not installed for {bare}" in str(error)
    assert elapsed < FAST_FAIL_S


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('if [ "$(hostname)" = host2 ]; then no-such-command; fi\n', "failed with status 127 on host host2"),
        ('if [ "$(hostname)" = host2 ]; then exit 3; fi\n', "exited with status 3 on host host2"),
        ("set -e\nfalse\necho unreachable\n", "exited with status 1 on host host"),
        (None, "is missing or not readable on host host"),
    ],
    ids=["command-fails", "exit", "set-e", "missing"],
)
def test_a_failing_env_file_is_reported_naming_the_host_and_the_file(
    bed: TestBed, tmp_path: Path, content: str | None, expected: str
) -> None:
    env_file = tmp_path / "env.sh"
    if content is not None:
        env_file.write_text(content)
    error, elapsed = launch_fails(trx.AgentFailedError, **on(bed, tmp_path, env_file=env_file))
    assert expected in str(error) and str(env_file) in str(error)
    assert elapsed < FAST_FAIL_S


# --------------------------------------------------------------------------- reaching hosts
def test_a_host_behind_a_proxy_jump_is_reached_through_it(bed: TestBed, tmp_path: Path) -> None:
    config = ssh_config(
        bed,
        tmp_path,
        f"""
        Host behind-host1
            HostName {bed.hosts[1].address}
            ProxyJump host1
            User root
            IdentityFile {bed.client_key}
            IdentitiesOnly yes
            UserKnownHostsFile {bed.known_hosts}
        """,
    )
    fields = on(bed, tmp_path, hostnames=["behind-host1"], ssh_config_file=config, workers_per_host=1, backend=None)
    assert trx.launch(ssh_client_address, executor="ssh", **fields)[0] == bed.hosts[0].address  # came from host1


def test_a_host_behind_a_proxy_command_is_reached_through_it(bed: TestBed, tmp_path: Path) -> None:
    config = ssh_config(
        bed,
        tmp_path,
        f"""
        Host through-command
            HostName {bed.hosts[1].address}
            ProxyCommand ssh -F {bed.ssh_config} -W %h:%p host1
            User root
            IdentityFile {bed.client_key}
            IdentitiesOnly yes
            UserKnownHostsFile {bed.known_hosts}
        """,
    )
    fields = on(bed, tmp_path, hostnames=["through-command"], ssh_config_file=config, workers_per_host=1, backend=None)
    assert trx.launch(ssh_client_address, **fields)[0] == bed.hosts[0].address


def launcher_the_agent_reached() -> str:
    """The launcher address in the command line of this worker's agent (its parent)."""
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return argv[argv.index("--launcher") + 1].rpartition(":")[0]


def test_launcher_address_field_overrides_the_route_based_choice(bed: TestBed, tmp_path: Path) -> None:
    fields = on(bed, tmp_path, launcher_address=bed.second_launcher_address)
    results = trx.launch(launcher_the_agent_reached, **fields)
    assert set(results.values()) == {bed.second_launcher_address}


def test_auto_executor_starts_agents_for_this_machine_locally_and_the_others_over_ssh(
    bed: TestBed, tmp_path: Path
) -> None:
    # backend None: a group spanning the root namespace and a host would need GLOO_SOCKET_IFNAME
    fields = on(bed, tmp_path, hostnames=[bed.launcher_address, "host1"], workers_per_host=1, backend=None)
    results = trx.launch(whoami, **fields)
    assert (results[0][0], results[1][0]) == (socket.gethostname(), "host1")


def test_a_slurm_allocation_gives_the_hosts_and_the_workers_per_host(
    bed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "host[1-2]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "3")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "3(x2)")
    results = trx.launch(whoami, **on(bed, tmp_path, hostnames="auto", workers_per_host="auto"))
    assert [(h, r, lr) for h, r, lr, _ in results.values()] == [
        ("host1", 0, 0), ("host1", 1, 1), ("host1", 2, 2), ("host2", 3, 0), ("host2", 4, 1), ("host2", 5, 2),
    ]  # fmt: skip
