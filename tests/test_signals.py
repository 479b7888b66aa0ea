"""Signals sent to the launcher while a run is in progress: SIGTERM, SIGUSR1 and SIGUSR2 go on to
every worker, the workers get `signal_grace` seconds to end, and the launcher raises
`RunInterrupted` naming the signal; nothing of the run is left within 5 s.

Each test runs a launcher in a process of its own (`LAUNCHER` below) and sends it real signals,
as a user's ``kill`` or a cluster's scheduler would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import torchrunx as trx
from conftest import processes_with_tag, wait_until_gone

NO_LEFTOVERS_S = 5.0

LAUNCHER = r'''"""python launcher.py READY-DIR REACTION LAUNCHER-FIELDS-JSON: launch 2 workers, print a report."""
import json, os, signal, sys, time
from pathlib import Path

import torchrunx as trx


def work(ready, reaction):
    """Note the signals of `reaction["handle"]`; on the first, return ("return") or go on ("ignore")."""
    got = []
    for name in reaction["handle"]:
        signal.signal(getattr(signal, name), lambda signum, frame: got.append(signal.Signals(signum).name))
    rank = os.environ["RANK"]
    Path(ready, rank).touch()
    written = 0
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if len(got) > written:
            Path(ready, f"{rank}.got").write_text(",".join(got))
            written = len(got)
            if reaction["then"] == "return":
                return got
        time.sleep(0.02)
    return got


ready, reaction, fields = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
try:
    results = trx.launch(work, {"ready": ready, "reaction": reaction}, **fields)
    report = {"results": dict(results)}
except trx.RunInterrupted as e:
    report = {
        "interrupted": e.signal, "signals": e.signals, "message": str(e),
        "results": dict(e.results) if e.results is not None else None,
        "cause": type(e.__cause__).__name__ if e.__cause__ is not None else None,
    }
except Exception as e:
    report = {"error": type(e).__name__, "message": str(e)}
print("REPORT " + json.dumps(report), flush=True)
'''


class Run:
    """A launcher process of `LAUNCHER`, whose 2 workers have started."""

    def __init__(self, tmp_path: Path, reaction: dict[str, Any], **fields: Any) -> None:
        script = tmp_path / "launcher.py"
        script.write_text(LAUNCHER)
        self.ready = tmp_path / "ready"
        self.ready.mkdir(exist_ok=True)
        local = {"hostnames": ["localhost"], "workers_per_host": 2, "backend": "gloo", "logs": str(tmp_path / "logs")}
        fields = local | fields
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.ready), json.dumps(reaction), json.dumps(fields)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.sent_at = 0.0

    def wait_started(self, files: tuple[str, ...] = ("0", "1"), timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all((self.ready / name).exists() for name in files):
            if self.process.poll() is not None:
                raise AssertionError(f"the launcher ended early:\n{self.process.stdout.read()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"not started within {timeout} s: {sorted(os.listdir(self.ready))}"
            time.sleep(0.05)

    def send(self, signum: int) -> None:
        self.sent_at = time.monotonic()
        self.process.send_signal(signum)

    def report(self, timeout: float = 60) -> tuple[dict[str, Any], float]:
        """The launcher's report, and how long after the signal it exited."""
        out, _ = self.process.communicate(timeout=timeout)
        took = time.monotonic() - self.sent_at
        lines = [line for line in out.splitlines() if line.startswith("REPORT ")]
        assert lines, f"no report from the launcher (exit code {self.process.returncode}):\n{out}"
        return json.loads(lines[-1].removeprefix("REPORT ")), took

    def got(self, rank: int) -> str | None:
        path = self.ready / f"{rank}.got"
        return path.read_text() if path.exists() else None


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """Where tests put their launchers: a launcher still running when its test ends is killed."""
    started: list[Run] = []
    yield started
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
        run.process.communicate()


@pytest.fixture
def start_run(tmp_path: Path, runs: list[Run]) -> Callable[..., Run]:
    """Start a launcher whose 2 workers run `work` with a reaction; returns once both have started."""

    def start(reaction: dict[str, Any], *, started: tuple[str, ...] = ("0", "1"), **fields: Any) -> Run:
        run = Run(tmp_path, reaction, **fields)
        runs.append(run)
        run.wait_started(started)
        return run

    return start


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_a_signal_to_the_launcher_reaches_every_worker_and_the_run_raises_run_interrupted(
    start_run: Callable[..., Run], tag: str, name: str
) -> None:
    run = start_run({"handle": [name], "then": "return"})
    run.send(signal.Signals[name])
    report, took = run.report()
    assert report.get("interrupted") == name, report
    assert run.got(0) == name and run.got(1) == name
    # every worker returned in time: the run still counts as interrupted, with the values kept
    assert report["results"] == {"0": [name], "1": [name]}
    assert report["message"] == (
        f"the run was interrupted by {name}: it was sent on to every worker, and every worker ended within "
        "signal_grace=30 s (2 returned)"
    )
    assert report["cause"] is None
    assert took < 10, took
    assert not wait_until_gone(tag, NO_LEFTOVERS_S)


@pytest.mark.timeout(90)
def test_workers_still_running_after_the_grace_period_are_stopped_and_the_error_names_the_signal(
    start_run: Callable[..., Run], tag: str
) -> None:
    run = start_run({"handle": ["SIGUSR1"], "then": "ignore"}, signal_grace=2)
    run.send(signal.SIGUSR1)
    report, took = run.report()
    assert report.get("interrupted") == "SIGUSR1", report
    assert run.got(0) == "SIGUSR1" and run.got(1) == "SIGUSR1"
    assert "stopped after signal_grace=2 s, with ranks 0, 1 still running" in report["message"]
    assert report["results"] is None
    assert 2 <= took < 2 + 8, took
    left = wait_until_gone(tag, NO_LEFTOVERS_S)
    assert not left, f"alive {NO_LEFTOVERS_S} s after the launcher ended: {left}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR2"])
def test_a_worker_without_a_handler_dies_of_the_signal_and_the_run_is_interrupted_not_failed(
    start_run: Callable[..., Run], tag: str, name: str
) -> None:
    run = start_run({"handle": [], "then": "ignore"}, signal_grace=60)
    run.send(signal.Signals[name])
    report, took = run.report()
    assert report.get("interrupted") == name, report
    assert report["message"].endswith(f"every worker ended within signal_grace=60 s (2 killed by signal {name})")
    assert report["cause"] == "WorkerFailedError"  # the deaths, kept as the cause
    assert took < 10, took  # not the grace period: every worker had ended
    assert not wait_until_gone(tag, NO_LEFTOVERS_S)


@pytest.mark.timeout(90)
def test_sigusr1_without_a_handler_dumps_the_workers_stacks_and_the_run_stops_after_the_grace_period(
    start_run: Callable[..., Run], tmp_path: Path, tag: str
) -> None:
    run = start_run({"handle": [], "then": "ignore"}, signal_grace=2)
    run.send(signal.SIGUSR1)
    report, _ = run.report()
    assert report.get("interrupted") == "SIGUSR1", report
    assert "still running" in report["message"]
    worker_log = next((tmp_path / "logs").glob("*_localhost_1.log")).read_text()
    assert "in work" in worker_log, worker_log[-2000:]  # faulthandler's stack dump: the worker was in work()
    assert not wait_until_gone(tag, NO_LEFTOVERS_S)


@pytest.mark.timeout(90)
def test_a_signal_while_the_agents_start_stops_the_run_at_once(
    start_run: Callable[..., Run], tmp_path: Path, tag: str
) -> None:
    env_file = tmp_path / "slow_env.sh"  # holds the agent back: the run is still starting
    env_file.write_text(f"touch {tmp_path}/ready/agent\nsleep 60\n")
    run = start_run({"handle": [], "then": "return"}, started=("agent",), env_file=str(env_file))
    run.send(signal.SIGTERM)
    report, took = run.report()
    assert report == {
        "interrupted": "SIGTERM",
        "signals": ["SIGTERM"],
        "message": "the run was interrupted by SIGTERM: the agents were still starting; the run was stopped at once",
        "results": None,
        "cause": None,
    }
    assert took < 10, took
    assert not wait_until_gone(tag, NO_LEFTOVERS_S)


@pytest.mark.timeout(90)
def test_a_second_signal_is_sent_on_too_and_named_in_the_error(start_run: Callable[..., Run], tag: str) -> None:
    run = start_run({"handle": ["SIGUSR1", "SIGTERM"], "then": "ignore"}, signal_grace=3)
    run.send(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while run.got(0) != "SIGUSR1" or run.got(1) != "SIGUSR1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.process.send_signal(signal.SIGTERM)
    report, _ = run.report()
    assert report["signals"] == ["SIGUSR1", "SIGTERM"]
    assert report["message"].startswith("the run was interrupted by SIGUSR1 (then SIGTERM): ")
    assert run.got(0) == "SIGUSR1,SIGTERM" and run.got(1) == "SIGUSR1,SIGTERM"
    assert not wait_until_gone(tag, NO_LEFTOVERS_S)


@pytest.mark.timeout(90)
def test_sigusr1_sent_to_an_agent_itself_goes_on_to_its_workers_and_the_run_goes_on(
    start_run: Callable[..., Run], tag: str
) -> None:
    # As SLURM signals a job's steps (`scancel --signal=USR1`), and with executor="slurm" an agent is one.
    run = start_run({"handle": ["SIGUSR1"], "then": "return"})
    ours = processes_with_tag(tag)
    agents = [pid for pid in ours if b"trx_core.agent" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    # workers are forked from the agent: the same command line, but the agent as their parent
    agent = [pid for pid in agents if parent(pid) not in agents]
    assert len(agent) == 1, agents
    os.kill(agent[0], signal.SIGUSR1)
    report, _ = run.report()
    assert report == {"results": {"0": ["SIGUSR1"], "1": ["SIGUSR1"]}}  # the launcher was not interrupted
    assert not wait_until_gone(tag, NO_LEFTOVERS_S)


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def sleep_briefly() -> str:
    time.sleep(1)
    return "done"


@pytest.mark.timeout(60)
def test_the_programs_own_handlers_are_back_after_the_run(local: dict[str, Any]) -> None:
    def own(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGUSR1, own)
    try:
        assert trx.launch(sleep_briefly, **local)[0] == "done"
        assert signal.getsignal(signal.SIGUSR1) is own
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.timeout(60)
def test_a_run_started_from_another_thread_leaves_signal_handling_alone(local: dict[str, Any]) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(trx.launch(sleep_briefly, **local)[0]))
    thread.start()
    while thread.is_alive():
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        time.sleep(0.05)
    thread.join()
    assert outcome == ["done"]


@pytest.mark.parametrize("grace", [-1, float("inf"), float("nan"), True, "30"])
def test_signal_grace_must_be_a_number_of_seconds(grace: object) -> None:
    with pytest.raises(trx.ConfigurationError, match="signal_grace"):
        trx.Launcher(hostnames=["localhost"], signal_grace=grace).validate()  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the recipe
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "preemptible.py"


@pytest.mark.timeout(180)
def test_preemptible_example_saves_a_checkpoint_on_sigusr1_and_resumes_from_it(tmp_path: Path, tag: str) -> None:
    argv = [sys.executable, str(EXAMPLE), "--checkpoint", "ckpt.pt", "--workers-per-host", "2", "--steps", "100"]
    env = {**os.environ, "TORCHRUNX_LOG_DIR": str(tmp_path / "logs")}
    first_out = tmp_path / "first.txt"
    with open(first_out, "w") as out:
        first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "step 20 " not in first_out.read_text():
            assert first.poll() is None and time.monotonic() < deadline, first_out.read_text()
            time.sleep(0.05)
        first.send_signal(signal.SIGUSR1)  # as `sbatch --signal=B:USR1@...` would, before a time limit
        assert first.wait(60) == 3, first_out.read_text()  # EXIT_INTERRUPTED
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    text = first_out.read_text()
    saved = int(text.split("interrupted by SIGUSR1: checkpoint at step ")[1].split()[0])
    assert 20 <= saved < 100, text
    assert (tmp_path / "ckpt.pt").is_file()

    second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"[localhost rank 0] resumed from step {saved}" in second.stdout
    assert f"finished: step 100 (started at {saved}) on 2 workers" in second.stdout
