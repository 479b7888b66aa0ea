"""Warm sessions: ``with Launcher(...) as launcher:`` starts the agents once, and every
``launcher.run()`` inside forks fresh workers from them, with a fresh rendezvous store.

What a session keeps (its agents) and what it must not keep (anything of one run's workers),
how failures of a run leave the session usable, how every process is gone whatever ends the
session (leaving the block, an exception, the launcher killed or frozen), how threads share a
session, and that 200 runs leak nothing. Real processes throughout; the agents are found as
the workers' parent (they fork them). The autouse `tag` fixture fails any test whose processes
outlive it by 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from conftest import processes_with_tag, wait_until_gone
from multihost import TestBed

GONE_S = 5.0  # the cleanup guarantee: nothing of a session is left 5 s after it ends
WARM_PHASES = ["workers started", "group formed", "returned"]  # in the order they end

_MODULE_STATE: dict[str, object] = {}  # a module global that a worker of one run sets


# --------------------------------------------------------------------------- worker functions
def rank() -> int:
    return int(os.environ["RANK"])


def agent_of_rank() -> int:
    return os.getppid()  # workers are forked by their agent


def placement() -> tuple[str, int, int]:
    return socket.gethostname(), rank(), os.getppid()


def leave_traces(elsewhere: str) -> dict[str, Any]:
    """Change what a later run could see if it reused this process: env, a global, an import, the cwd."""
    imported_before = "tabnanny" in sys.modules
    os.environ["TRX_LEFT_BY_AN_EARLIER_RUN"] = "yes"
    _MODULE_STATE["left by an earlier run"] = rank()
    import tabnanny  # noqa: F401  # a module nothing else imports

    os.chdir(elsewhere)
    return {"imported before": imported_before, "pid": os.getpid(), "port": os.environ["MASTER_PORT"]}


def look_for_traces() -> dict[str, Any]:
    return {
        "env": os.environ.get("TRX_LEFT_BY_AN_EARLIER_RUN"),
        "global": dict(_MODULE_STATE),
        "imported": "tabnanny" in sys.modules,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "port": os.environ["MASTER_PORT"],
    }


def rank_1_raises() -> None:
    if rank() == 1:
        raise KeyError("raised by rank 1")
    time.sleep(60)  # the run stops this peer, it does not wait for it


def rank_1_dies(how: str) -> None:
    if rank() == 1:
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def busy_for(seconds: float, label: str) -> tuple[str, int, float, float]:
    start = time.time()
    time.sleep(seconds)
    return label, rank(), start, time.time()


def meet(me: str, other: str, folder: str) -> tuple[str, int, bool]:
    """Print a line naming `me`; say whether a worker of the other launcher's run shows up
    while this one is running (it cannot if the two runs are serialised)."""
    print(f"printed by a worker of launcher {me}", flush=True)
    Path(folder, f"{me}-{rank()}").touch()
    deadline = time.monotonic() + 60
    while not Path(folder, f"{other}-{rank()}").exists():
        if time.monotonic() > deadline:
            return me, rank(), False
        time.sleep(0.02)
    return me, rank(), True


# --------------------------------------------------------------------------- helpers
def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie is already dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_dead(pids: list[int], seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def _fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _children(pid: int) -> list[int]:
    """Every child of `pid`, zombies included (a worker nobody reaped counts)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def _ranks(result: trx.LaunchResult) -> dict[int, Any]:
    return dict(result)


SESSION_SCRIPT = r'''"""python session.py MODE READY FIELDS-JSON: a session whose first run notes its agents, then:
idle: waits; running: a second run whose workers wait; interrupt: that second run, Ctrl-C'ed,
then a third run, and a report."""
import json, os, sys, time
from pathlib import Path

import torchrunx as trx


def agent_of_rank():
    return os.getppid()


def wait_after_saying_so(ready):
    Path(ready, f"rank-{os.environ['RANK']}.tmp").write_text(f"{os.getpid()} {os.getppid()}")
    os.replace(Path(ready, f"rank-{os.environ['RANK']}.tmp"), Path(ready, f"rank-{os.environ['RANK']}"))
    time.sleep(300)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


mode, ready, fields = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
with trx.Launcher(**fields) as launcher:
    agents = sorted(set(launcher.run(agent_of_rank).values()))
    Path(ready, "agents.tmp").write_text(json.dumps(agents))
    os.replace(Path(ready, "agents.tmp"), Path(ready, "agents"))
    if mode == "idle":
        time.sleep(300)
    elif mode == "running":
        launcher.run(wait_after_saying_so, {"ready": str(ready)})
    elif mode == "interrupt":
        try:
            launcher.run(wait_after_saying_so, {"ready": str(ready)})
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        workers = [int(p.read_text().split()[0]) for p in ready.glob("rank-*") if not p.name.endswith(".tmp")]
        end = time.monotonic() + 5
        while [w for w in workers if alive(w)] and time.monotonic() < end:
            time.sleep(0.05)
        left = [w for w in workers if alive(w)]
        then = launcher.run(agent_of_rank)
        report = {"interrupted": interrupted, "workers": workers, "left": left, "agents": agents,
                  "then": {str(r): v for r, v in then.items()}}
        print("REPORT " + json.dumps(report), flush=True)
'''


class SessionScript:
    """A launcher process running `SESSION_SCRIPT` in `mode` with the Launcher `fields`."""

    def __init__(self, tmp_path: Path, mode: str, **fields: Any) -> None:
        script = tmp_path / "session.py"
        script.write_text(SESSION_SCRIPT)
        self.ready = tmp_path / "ready"
        self.ready.mkdir()
        self.process = subprocess.Popen(
            [sys.executable, str(script), mode, str(self.ready), json.dumps(fields)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait_for(self, *names: str, seconds: float = 90.0) -> None:
        """Until the files `names` exist in the ready folder (written by the script or its workers)."""
        deadline = time.monotonic() + seconds
        while not all((self.ready / name).exists() for name in names):
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise AssertionError(f"the launcher script ended early: {err.decode(errors='replace')}")
            assert time.monotonic() < deadline, f"{names} did not appear within {seconds} s"
            time.sleep(0.05)

    @property
    def agents(self) -> list[int]:
        return list(json.loads((self.ready / "agents").read_text()))

    def kill(self) -> None:
        self.process.kill()
        self.process.communicate(timeout=30)


@pytest.fixture
def bed(multihost_bed: TestBed) -> Iterator[TestBed]:
    """The two hosts of the test bed; fails the test if any process of it is left on them."""
    yield multihost_bed
    left = multihost_bed.wait_no_leftovers()
    assert not left, f"processes left on the hosts after the test: {left}"


def on_bed(bed: TestBed, tmp_path: Path) -> dict[str, Any]:
    """Launcher fields (JSON-friendly) for both hosts of `bed` x 2 workers, over SSH."""
    return {
        "hostnames": bed.aliases,
        "workers_per_host": 2,
        "ssh_config_file": str(bed.ssh_config),
        "backend": "gloo",
        "logs": str(tmp_path / "logs"),
        "log_console": None,
        "timeout": 60,
    }


# --------------------------------------------------------------------------- isolation
@pytest.mark.timeout(90)
def test_nothing_a_run_changed_in_its_workers_is_seen_by_the_next_run(tmp_path: Path, local: dict[str, object]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with trx.Launcher(workers_per_host=2, **local) as launcher:
        first = launcher.run(leave_traces, {"elsewhere": str(elsewhere)})
        then = launcher.run(look_for_traces)
    assert [first[r]["imported before"] for r in range(2)] == [False, False]
    for r in range(2):
        assert (then[r]["env"], then[r]["global"], then[r]["imported"]) == (None, {}, False), then[r]
        assert then[r]["cwd"] == os.getcwd()  # the launcher's, not the one the earlier run moved to
    assert len({first[r]["port"] for r in range(2)}) == len({then[r]["port"] for r in range(2)}) == 1
    assert first[0]["port"] != then[0]["port"], "the second run reused the first run's rendezvous store"
    assert not {first[r]["pid"] for r in range(2)} & {then[r]["pid"] for r in range(2)}


def copied_variables() -> tuple[str | None, str | None]:
    return os.environ.get("WANDB_RUN_NAME"), os.environ.get("WANDB_MODE")


@pytest.mark.timeout(90)
def test_the_launchers_environment_is_read_again_for_every_run_of_a_session(
    local: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # copied by the default env_vars (WANDB_*)
    monkeypatch.delenv("WANDB_RUN_NAME", raising=False)
    with trx.Launcher(workers_per_host=1, **local) as launcher:
        assert launcher.run(copied_variables)[0] == (None, "offline")
        monkeypatch.setenv("WANDB_RUN_NAME", "trial-1")  # a sweep naming each trial
        monkeypatch.delenv("WANDB_MODE")
        assert launcher.run(copied_variables)[0] == ("trial-1", None)
        monkeypatch.setenv("WANDB_RUN_NAME", "trial-2")
        assert launcher.run(copied_variables)[0] == ("trial-2", None)


# --------------------------------------------------------------------------- failures keep the session
@pytest.mark.timeout(120)
def test_a_worker_exception_fails_that_run_with_its_type_and_the_next_run_passes(
    local: dict[str, object],
) -> None:
    with trx.Launcher(workers_per_host=2, **local) as launcher:
        agents = launcher.run(agent_of_rank)
        start = time.monotonic()
        with pytest.raises(KeyError, match="raised by rank 1"):
            launcher.run(rank_1_raises)
        assert time.monotonic() - start < 30  # rank 0, sleeping 60 s, was stopped
        assert launcher.run(agent_of_rank) == agents  # the same agents: the session was kept
        assert _ranks(launcher.run(rank)) == {0: 0, 1: 1}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit", "SIGKILL"])
def test_a_worker_death_fails_that_run_with_worker_failed_error_and_the_next_run_passes(
    local: dict[str, object], how: str
) -> None:
    with trx.Launcher(workers_per_host=2, **local) as launcher:
        agents = launcher.run(agent_of_rank)
        start = time.monotonic()
        with pytest.raises(trx.WorkerFailedError) as info:
            launcher.run(rank_1_dies, {"how": how})
        assert time.monotonic() - start < 30
        assert (info.value.rank, info.value.local_rank) == (1, 1)
        assert launcher.run(agent_of_rank) == agents
        assert _ranks(launcher.run(rank)) == {0: 0, 1: 1}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("victim", ["localhost", "127.0.0.1"], ids=["agent-0-hosting-the-store", "agent-1"])
def test_an_agent_killed_between_runs_is_started_again_by_the_next_run_with_a_warning(
    local: dict[str, object], victim: str
) -> None:
    hosts = ["localhost", "127.0.0.1"]
    fields = {**local, "hostnames": hosts, "workers_per_host": 2, "executor": "local"}
    with trx.Launcher(**fields) as launcher:
        before = launcher.run(placement)
        agents = {host: before.index(host, 0)[2] for host in hosts}
        os.kill(agents[victim], signal.SIGKILL)
        assert not _wait_dead([agents[victim]], 10)
        time.sleep(1.0)  # a heartbeat's time: lost between runs, not found lost by the next one
        with pytest.warns(RuntimeWarning, match=victim):
            after = launcher.run(placement)
        assert [after[r][1] for r in range(4)] == [0, 1, 2, 3]
        restarted = {host: after.index(host, 0)[2] for host in hosts}
        assert not set(restarted.values()) & set(agents.values()), "every agent of the session starts again"
        survivor = [pid for host, pid in agents.items() if host != victim]
        assert not _wait_dead(survivor, GONE_S), "the agent that was not killed was left running"
        assert _ranks(launcher.run(rank)) == {0: 0, 1: 1, 2: 2, 3: 3}  # and the session goes on warm


# --------------------------------------------------------------------------- ending a session
@pytest.mark.timeout(90)
def test_leaving_the_block_by_an_exception_stops_every_agent(tag: str, local: dict[str, object]) -> None:
    # the launcher's block inside pytest.raises: the user's error must come out of it unchanged
    with (
        pytest.raises(LookupError, match="the user's own error"),
        trx.Launcher(workers_per_host=2, **local) as launcher,
    ):
        agents = sorted(set(launcher.run(agent_of_rank).values()))
        assert all(_alive(a) for a in agents)
        raise LookupError("the user's own error")
    assert not wait_until_gone(tag, GONE_S)


@pytest.mark.timeout(90)
def test_start_returns_the_launcher_and_close_can_be_called_twice(tag: str, local: dict[str, object]) -> None:
    launcher = trx.Launcher(workers_per_host=2, **local)
    assert launcher.start() is launcher
    try:
        assert _ranks(launcher.run(rank)) == {0: 0, 1: 1}
    finally:
        launcher.close()
    launcher.close()
    assert not wait_until_gone(tag, GONE_S)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["idle", "running"])
def test_killing_the_launcher_of_a_session_leaves_nothing_behind(tmp_path: Path, tag: str, mode: str) -> None:
    fields = {"hostnames": ["localhost"], "workers_per_host": 2, "backend": "gloo", "logs": str(tmp_path / "logs")}
    launcher = SessionScript(tmp_path, mode, **fields)
    try:
        launcher.wait_for("agents", *(["rank-0", "rank-1"] if mode == "running" else []))
        assert all(_alive(a) for a in launcher.agents)
    finally:
        launcher.kill()
    left = wait_until_gone(tag, GONE_S)
    assert not left, f"alive {GONE_S} s after the launcher was SIGKILLed ({mode}): {left}"


@pytest.mark.timeout(90)
def test_an_idle_agent_whose_launcher_stopped_answering_exits_by_itself(tmp_path: Path, tag: str) -> None:
    heartbeat_timeout = 3
    fields = {
        "hostnames": ["localhost"], "workers_per_host": 2, "backend": "gloo", "logs": str(tmp_path / "logs"),
        "heartbeat_timeout": heartbeat_timeout,
    }  # fmt: skip
    launcher = SessionScript(tmp_path, "idle", **fields)
    try:
        launcher.wait_for("agents")
        agents = launcher.agents
        assert all(_alive(a) for a in agents)
        launcher.process.send_signal(signal.SIGSTOP)  # alive, connected, silent: a launcher whose host froze
        seconds = heartbeat_timeout + 3 * GONE_S
        end = time.monotonic() + seconds
        while (left := [p for p in processes_with_tag(tag) if p != launcher.process.pid]) and time.monotonic() < end:
            time.sleep(0.1)
        assert not left, f"still alive {seconds} s after their launcher froze (agents {agents}): {left}"
    finally:
        launcher.kill()


# --------------------------------------------------------------------------- Ctrl-C, the notebook pattern
@pytest.mark.timeout(120)
def test_ctrl_c_during_a_session_run_stops_its_workers_keeps_the_session_and_raises_keyboard_interrupt(
    tmp_path: Path,
) -> None:
    fields = {"hostnames": ["localhost"], "workers_per_host": 2, "backend": "gloo", "logs": str(tmp_path / "logs")}
    launcher = SessionScript(tmp_path, "interrupt", **fields)
    try:
        launcher.wait_for("agents", "rank-0", "rank-1")
        launcher.process.send_signal(signal.SIGINT)
        out, err = launcher.process.communicate(timeout=60)
    finally:
        if launcher.process.poll() is None:
            launcher.kill()
    reports = [line for line in out.decode().splitlines() if line.startswith("REPORT ")]
    assert reports, f"no report (exit {launcher.process.returncode}): {err.decode(errors='replace')[-3000:]}"
    report = json.loads(reports[-1].removeprefix("REPORT "))
    assert report["interrupted"], "run() did not raise KeyboardInterrupt"
    assert len(report["workers"]) == 2 and report["left"] == [], f"workers alive 5 s after Ctrl-C: {report['left']}"
    assert set(report["then"]) == {"0", "1"}
    assert sorted(set(report["then"].values())) == report["agents"], "the session's agents were not kept"
    assert launcher.process.returncode == 0


# --------------------------------------------------------------------------- threads
@pytest.mark.timeout(120)
def test_two_threads_running_on_one_session_get_their_own_results_one_run_after_the_other(
    local: dict[str, object],
) -> None:
    with trx.Launcher(workers_per_host=2, **local) as launcher:
        launcher.run(rank)  # warm
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(launcher.run, busy_for, {"seconds": 1.0, "label": label}) for label in "ab"]
            a, b = (f.result(timeout=90) for f in futures)
    assert [a[r][:2] for r in range(2)] == [("a", 0), ("a", 1)]
    assert [b[r][:2] for r in range(2)] == [("b", 0), ("b", 1)]
    spans = sorted([(min(x[r][2] for r in range(2)), max(x[r][3] for r in range(2))) for x in (a, b)])
    assert spans[0][1] <= spans[1][0], f"the runs overlapped: {spans}"


@pytest.mark.timeout(150)
def test_sessions_of_two_launchers_in_two_threads_run_at_the_same_time_with_their_own_results_and_logs(
    tmp_path: Path,
) -> None:
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    launchers = {
        name: trx.Launcher(
            hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=tmp_path / name, log_console=None
        )
        for name in ("a", "b")
    }
    for launcher in launchers.values():
        launcher.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = {
                me: pool.submit(launchers[me].run, meet, {"me": me, "other": other, "folder": str(meeting)})
                for me, other in (("a", "b"), ("b", "a"))
            }
            results = {me: dict(f.result(timeout=120)) for me, f in futures.items()}
    finally:
        for launcher in launchers.values():
            launcher.close()
    assert results == {me: {0: (me, 0, True), 1: (me, 1, True)} for me in "ab"}
    for me, other in (("a", "b"), ("b", "a")):
        text = "".join(p.read_text(errors="replace") for p in (tmp_path / me).iterdir())
        assert f"printed by a worker of launcher {me}" in text
        assert f"printed by a worker of launcher {other}" not in text


# --------------------------------------------------------------------------- many runs
def _measure(agents: list[int]) -> dict[str, Any]:
    return {
        "launcher fds": _fd_count(),
        "launcher threads": len(os.listdir("/proc/self/task")),
        "python threads": threading.active_count(),
        "agent fds": {a: _fd_count(a) for a in agents},
        "agent rss KiB": {a: _rss_kib(a) for a in agents},
        "agent children": {a: len(_children(a)) for a in agents},
    }


@pytest.mark.timeout(240)
def test_200_runs_in_one_session_leak_nothing_in_the_launcher_or_the_agents_and_each_takes_little() -> None:
    fields: dict[str, Any] = {"hostnames": ["localhost"], "workers_per_host": 2, "backend": "gloo"}
    durations: list[float] = []
    marks: dict[int, dict[str, Any]] = {}
    with trx.Launcher(**fields, logs=None, log_console=None) as launcher:
        for i in range(1, 201):
            start = time.perf_counter()
            # a builtin: unpickled by reference without importing this test module (and pytest) in each worker
            result = launcher.run(os.getppid)
            durations.append(time.perf_counter() - start)
            assert len(result) == 2
            if i in (20, 200):
                time.sleep(0.5)  # both measured alike, once what ends after a run has ended
                marks[i] = _measure(sorted(set(result.values())))
    before, after = marks[20], marks[200]
    assert after["agent fds"].keys() == before["agent fds"].keys(), "the agents changed during the session"
    assert after["launcher fds"] <= before["launcher fds"] + 2, (before, after)
    assert after["launcher threads"] <= before["launcher threads"] + 1, (before, after)
    assert after["python threads"] <= before["python threads"] + 1, (before, after)
    for agent in before["agent fds"]:
        assert after["agent fds"][agent] <= before["agent fds"][agent] + 2, (before, after)
        assert after["agent children"][agent] <= before["agent children"][agent], (before, after)
        assert after["agent rss KiB"][agent] - before["agent rss KiB"][agent] < 10 * 1024, (before, after)
    warm = durations[1:]
    print(
        f"200 runs: first {durations[0]:.3f} s, warm median {statistics.median(warm):.4f} s, "
        f"p90 {sorted(warm)[int(0.9 * len(warm))]:.4f} s, max {max(warm):.3f} s, over 1 s: "
        f"{ {i + 1: round(d, 3) for i, d in enumerate(durations) if d > 1} }; at run 20 {before}, at 200 {after}"
    )
    assert statistics.median(warm) < 0.2, f"warm runs take {statistics.median(warm):.3f} s (median)"


# --------------------------------------------------------------------------- configuration
@pytest.mark.timeout(120)
def test_changing_a_field_while_the_session_is_open_raises_configuration_error_at_run(
    local: dict[str, object],
) -> None:
    launcher = trx.Launcher(workers_per_host=2, **local).start()
    try:
        assert _ranks(launcher.run(rank)) == {0: 0, 1: 1}
        launcher.workers_per_host = 3
        with pytest.raises(trx.ConfigurationError, match="workers_per_host"):
            launcher.run(rank)
    finally:
        launcher.close()
    assert _ranks(launcher.run(rank)) == {0: 0, 1: 1, 2: 2}  # outside a session: a cold run, as set now


# --------------------------------------------------------------------------- over SSH
@pytest.mark.multihost
@pytest.mark.timeout(150)
def test_a_session_over_ssh_runs_twice_on_the_same_agents_and_the_second_run_skips_their_start(
    bed: TestBed, tmp_path: Path
) -> None:
    with trx.Launcher(**on_bed(bed, tmp_path)) as launcher:
        first = launcher.run(placement)
        second = launcher.run(placement)
    expected = [("host1", 0), ("host1", 1), ("host2", 2), ("host2", 3)]
    assert [first[r][:2] for r in range(4)] == [second[r][:2] for r in range(4)] == expected
    assert [first[r][2] for r in range(4)] == [second[r][2] for r in range(4)], "the agents changed between runs"
    assert sorted(second.phases) == sorted(WARM_PHASES), second.phases
    times = [second.phases[p] for p in WARM_PHASES]
    assert times == sorted(times), second.phases


@pytest.mark.multihost
@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["idle", "running"])
def test_killing_the_launcher_of_a_session_leaves_nothing_on_any_host(
    bed: TestBed, tmp_path: Path, tag: str, mode: str
) -> None:
    launcher = SessionScript(tmp_path, mode, **on_bed(bed, tmp_path))
    try:
        launcher.wait_for("agents", *([f"rank-{r}" for r in range(4)] if mode == "running" else []))
        assert bed.leftover_processes(), "no agent found on the hosts"
    finally:
        launcher.kill()
    killed_at = time.monotonic()
    on_hosts = bed.wait_no_leftovers(timeout=GONE_S)
    assert not on_hosts, f"alive {time.monotonic() - killed_at:.1f} s after the launcher was SIGKILLed: {on_hosts}"
    assert not wait_until_gone(tag, 1.0)
