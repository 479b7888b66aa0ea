"""Whatever ends a run — success, failure, or the launcher being interrupted or killed —
every agent, worker and worker child of it is gone within 5 s."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import processes_with_tag, wait_until_gone

LAUNCHER_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import torchrunx as trx

    def work(ready_dir):
        # a child of the worker, in a session of its own, as a data loader or a shell tool might start
        subprocess.Popen(["sleep", "300"], start_new_session=True)
        subprocess.Popen(["sleep", "300"])
        open(os.path.join(ready_dir, os.environ["RANK"]), "w").close()
        time.sleep(300)

    if __name__ == "__main__":
        trx.launch(work, {"ready_dir": sys.argv[1]}, hostnames=["localhost"], workers_per_host=2,
                   backend="gloo", logs=sys.argv[2])
    """
)


def start_launcher(tmp_path: Path, script: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    if script is None:
        script = tmp_path / "launcher.py"
        script.write_text(LAUNCHER_SCRIPT)
    ready = tmp_path / "ready"
    ready.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, str(script), str(ready), str(tmp_path / "logs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < 2:
        if launcher.poll() is not None:
            raise AssertionError(f"the launcher ended early: {launcher.stderr.read().decode()}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "workers did not start within 60 s"
        time.sleep(0.05)
    return launcher, ready


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_the_launcher_leaves_no_process_of_the_run_behind(tmp_path: Path, tag: str, signum: int) -> None:
    launcher, _ = start_launcher(tmp_path)
    # agent, 2 workers, 4 worker children (the launcher itself is tagged too)
    assert len(processes_with_tag(tag)) >= 8
    launcher.send_signal(signum)
    killed_at = time.monotonic()
    launcher.wait(10)
    left = wait_until_gone(tag, 5.0)
    assert not left, f"alive {time.monotonic() - killed_at:.1f} s after {signal.Signals(signum).name}: {left}"


def test_ctrl_c_in_the_launcher_raises_keyboard_interrupt_after_cleaning_up(tmp_path: Path, tag: str) -> None:
    launcher, _ = start_launcher(tmp_path)
    launcher.send_signal(signal.SIGINT)
    launcher.wait(10)
    assert b"KeyboardInterrupt" in launcher.stderr.read()  # type: ignore[union-attr]
    assert launcher.returncode != 0


def test_agents_stop_their_workers_when_the_launcher_stops_answering(tmp_path: Path, tag: str) -> None:
    script = tmp_path / "frozen_launcher.py"
    script.write_text(LAUNCHER_SCRIPT.replace('backend="gloo",', 'backend="gloo", heartbeat_timeout=3,'))
    launcher, _ = start_launcher(tmp_path, script)
    launcher.send_signal(signal.SIGSTOP)  # connected but silent: as a launcher whose host froze
    try:
        others = wait_until_gone_except(tag, launcher.pid, 3 + 5.0)
        assert not others, f"still alive 8 s after the launcher froze: {others}"
    finally:
        launcher.kill()
        launcher.wait()


def wait_until_gone_except(tag: str, keep: int, seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while (left := [p for p in processes_with_tag(tag) if p != keep]) and time.monotonic() < end:
        time.sleep(0.1)
    return left
