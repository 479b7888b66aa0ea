#!/usr/bin/env python
"""Warm sessions: repeated no-op runs from agents that stay up, against repeated cold launches.

Every contender is one long-lived process, driven by this script one command at a time (a line
on a pipe; the contender times the call itself and answers with a line of JSON), so that each
contender makes all of its launches from one process, as a program that launches in a loop
does, and the contenders alternate: in each round every contender does its cycle once, and
which one goes first rotates from round to round. Contenders, per setup:

- ``session``: torchrunx from this checkout, ``Launcher(hostnames=..., workers_per_host=N,
  backend="gloo", logs=None, log_console=None)``. Each round opens a session (``start()``,
  timed), makes a first run (timed: the session's cold run), then ``--warm-runs`` more runs
  (timed: the warm runs), waits a second with the session idle to read its agents' memory
  from ``/proc``, and closes the session (``close()``, timed);
- ``cold``: the same settings, ``run()`` on a Launcher that never opens a session (cold, as
  every run was before sessions);
- ``base``: that cold ``run()`` with torchrunx from another revision (``--baseline``, by default
  the last commit before sessions; a ``git archive`` of its packages first on ``PYTHONPATH``):
  "cold runs no slower than today" is judged against it;
- ``elastic_launch``: ``torch.distributed.launcher.api.elastic_launch`` called again and again
  in one process (c10d rendezvous on ``localhost:0``, a fresh ``run_id`` per call,
  ``max_restarts=0``), the entrypoint doing a gloo ``init_process_group``, a barrier and
  ``destroy_process_group`` (the work torchrunx's workers do around the function);
- ``upstream-0.4``: torchrunx 0.4 from PyPI (``benchmarks/.venv-upstream``, see ``_upstream.py``),
  ``Launcher(...).set_logging_handlers(None).run(noop)`` again and again in one process.

Setups: N workers on localhost (``--workers``, default 2 and 4), and with ``--ssh`` (root) the
two hosts of the network-namespace test bed of ``tests/multihost.py`` x 2 workers. There is no
``elastic_launch`` over SSH; upstream 0.4 runs there in a mount and UTS namespace of its own
whose hostname is ``launcher`` and whose ``/etc/hosts`` is the bed's, since 0.4 resolves the
host names itself (before its ssh client reads the ssh config) and tells its agents to connect
back to this machine's own hostname.

The first command of every contender process is an untimed warm-up of its cycle
(``--no-warmup`` to skip it), so the repeated runs of ``elastic_launch`` and upstream 0.4 are
those of a process that already launched once.

Prints per setup and contender the median, min-max and count of each timed step, the ratios of
medians to ``elastic_launch``'s and upstream 0.4's repeated run, the phases torchrunx reports
(``LaunchResult.phases``) for warm, first and cold runs, the idle agents' memory, and whether the
targets hold. A measuring tool, not a test: exits 0 whatever the numbers are.

Run from the repository root:  ./dev hatch run python benchmarks/bench_session.py [--rounds 5] [--ssh]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import _upstream
from _provenance import checkout, package_version

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "c59737e"  # the last commit before warm sessions (issue #14): what "today" means for cold runs
COMMAND_TIMEOUT_S = 300.0
IDLE_S = 1.0  # how long a session sits idle before its agents' memory is read
SSH_SETUP = "ssh 2x2"
CONTENDERS = ("session", "cold", "base", "elastic_launch", "upstream-0.4")

# Contender scripts. Each reads commands from the file descriptor in argv[1], answers each with
# one JSON line on the descriptor in argv[2] ({"wall": s, "phases": {...}} or {"error": "..."}),
# and takes its settings as JSON in argv[3]. Its stdout and stderr go to a log file, so whatever
# its agents or workers print cannot get mixed into the answers.

_SERVE = """\
def serve(handle):
    commands = os.fdopen(int(sys.argv[1]), "r")
    replies = os.fdopen(int(sys.argv[2]), "w", buffering=1)
    for line in commands:
        command = line.strip()
        if command == "quit":
            break
        began = time.perf_counter()
        try:
            phases = handle(command) or {}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        else:
            reply = {"wall": time.perf_counter() - began, "phases": phases}
        replies.write(json.dumps(reply) + "\\n")
"""

_TRX_SCRIPT = f"""\
import contextlib
import json
import os
import sys
import time

import torchrunx as trx


def noop():
    pass


{_SERVE}

if __name__ == "__main__":
    settings = json.loads(sys.argv[3])
    session = trx.Launcher(**settings)  # start() ... run() ... close(): the warm form
    plain = trx.Launcher(**settings)  # run() and nothing else: a cold run each time

    def handle(command):
        if command == "start":
            session.start()
        elif command == "run":
            return dict(session.run(noop).phases)
        elif command == "close":
            session.close()
        elif command == "cold":
            return dict(getattr(plain.run(noop), "phases", {{}}))
        else:
            raise ValueError(f"unknown command {{command!r}}")

    try:
        serve(handle)
    finally:
        with contextlib.suppress(Exception):
            session.close()
"""

_ELASTIC_SCRIPT = f"""\
import json
import os
import sys
import time
import uuid

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def entrypoint():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


{_SERVE}

if __name__ == "__main__":
    workers = json.loads(sys.argv[3])["workers"]

    def handle(command):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", run_id=uuid.uuid4().hex, max_restarts=0)
        environ = dict(os.environ)
        try:
            elastic_launch(config, entrypoint)()
        finally:  # elastic_launch exports TORCHELASTIC_* into this process; the next call starts clean
            os.environ.clear()
            os.environ.update(environ)

    serve(handle)
"""

_UPSTREAM_SCRIPT = f"""\
import json
import os
import sys
import time

import torchrunx as trx


def noop():
    pass


{_SERVE}

if __name__ == "__main__":
    settings = json.loads(sys.argv[3])
    launcher = trx.Launcher(hostnames=settings["hostnames"], workers_per_host=settings["workers"], backend="gloo",
                            ssh_config_file=settings.get("ssh_config_file"))
    launcher.set_logging_handlers(None)

    def handle(command):
        launcher.run(noop)

    serve(handle)
"""


# ---------------------------------------------------------------------------------------------
# Contender processes
# ---------------------------------------------------------------------------------------------


class CommandFailed(Exception):
    """A contender answered a command with an error, or did not answer; the message says which."""


@dataclass
class Contender:
    """One long-lived contender process and the pipes it is driven through."""

    setup: str
    name: str
    label: str  # as shown in the table
    argv: list[str]
    settings: dict[str, Any]
    env: dict[str, str] | None
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    commands: IO[str] | None = None
    replies: IO[str] | None = None
    broken: str | None = None  # why this contender is out of the measurement

    def spawn(self, log: Path) -> None:
        command_r, command_w = os.pipe()
        reply_r, reply_w = os.pipe()
        with log.open("ab") as out:
            # a session of its own, so that whatever it leaves behind can be found and ended
            self.proc = subprocess.Popen(
                [*self.argv, str(command_r), str(reply_w), json.dumps(self.settings)], cwd=self.cwd, env=self.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, pass_fds=(command_r, reply_w),
                start_new_session=True,
            )  # fmt: skip
        os.close(command_r)
        os.close(reply_w)
        self.commands = os.fdopen(command_w, "w", buffering=1)
        self.replies = os.fdopen(reply_r, "r")

    def ask(self, command: str) -> dict[str, Any]:
        """Send one command; its answer, or CommandFailed."""
        assert self.commands is not None and self.replies is not None
        if self.broken:
            raise CommandFailed(self.broken)
        try:
            self.commands.write(command + "\n")
        except BrokenPipeError:
            self._break(f"the {self.name} process exited")
        ready, _, _ = select.select([self.replies], [], [], COMMAND_TIMEOUT_S)
        line = self.replies.readline() if ready else None
        if line is None:
            self._break(f"no answer to {command!r} within {COMMAND_TIMEOUT_S:.0f} s")
        if not line:
            self._break(f"the {self.name} process exited during {command!r}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise CommandFailed(reply["error"])
        return reply

    def _break(self, why: str) -> None:
        self.broken = why
        if self.proc is not None:
            _end_group(self.proc.pid, grace=0)
        raise CommandFailed(why)

    def quit(self) -> int:
        """Ask the process to end; how many processes of its group were still there 5 s later."""
        if self.proc is None:
            return 0
        # its agents may run in sessions of their own: the process group alone would not show them
        below = {pid: _start_time(pid) for pid in _descendants(self.proc.pid)}
        with contextlib.suppress(OSError):
            assert self.commands is not None
            self.commands.write("quit\n")
            self.commands.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        deadline = time.monotonic() + 5.0
        while (alive := [p for p, t in below.items() if t is not None and _start_time(p) == t]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        left = _end_group(self.proc.pid, grace=max(0.0, deadline - time.monotonic()))
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        left += len(alive)
        if self.replies is not None:
            self.replies.close()
        return left


def _end_group(pgid: int, grace: float) -> int:
    """Wait up to `grace` seconds for process group `pgid` to be gone, then SIGKILL it; how many were left."""
    deadline = time.monotonic() + grace
    while True:
        members = [p.pid for p in _processes().values() if p.pgrp == pgid]
        if not members:
            return 0
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return len(members)
        time.sleep(0.05)


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgrp: int


def _processes() -> dict[int, Proc]:
    """Every live (not zombie) process of this machine, from /proc."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if fields[0] != "Z":
            found[int(entry.name)] = Proc(int(entry.name), int(fields[1]), int(fields[2]))
    return found


def _start_time(pid: int) -> str | None:
    """The start time of a live process (tells a pid from a later process reusing it); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in _processes().values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Memory of idle agents
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcMemory:
    pid: int
    command: str
    rss_mib: float
    pss_mib: float | None


def memory_of(pids: list[int]) -> list[ProcMemory]:
    """RSS (from /proc/PID/status) and PSS (from smaps_rollup) of each process still there; a
    process forked from another of the list (same command line) is shown as a fork of it."""
    table = _processes()
    commands = {pid: _cmdline(pid) for pid in pids}
    out = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        command = commands[pid]
        parent = table[pid].ppid if pid in table else 0
        if parent in commands and commands[parent] == command:
            command = f"fork of {parent} (on agent 0: the stores of the coming runs)"
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        pss = None
        with contextlib.suppress(OSError, StopIteration):
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            pss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) / 1024
        out.append(ProcMemory(pid, _short(command), rss / 1024, pss))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _short(command: str, width: int = 70) -> str:
    words = command.split()
    if words and "/" in words[0]:
        words[0] = words[0].rsplit("/", 1)[1]
    text = " ".join(words)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Setups
# ---------------------------------------------------------------------------------------------


def trx_settings(hostnames: list[str], workers: int, ssh_config: Path | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"hostnames": hostnames, "workers_per_host": workers, "backend": "gloo",
                                "logs": None, "log_console": None}  # fmt: skip
    if ssh_config is not None:
        settings["ssh_config_file"] = str(ssh_config)
    return settings


def contenders_of(
    setup: str, hostnames: list[str], workers: int, tmp: Path, wanted: list[str], base: Path | None,
    upstream: Path | None, ssh_config: Path | None = None, hosts_file: Path | None = None,
) -> list[Contender]:  # fmt: skip
    """The contenders wanted for one setup (hosts x workers); their scripts go in a folder of their own."""
    scripts = tmp / setup.replace(" ", "_").replace("=", "")
    scripts.mkdir()
    trx_script = _write(scripts / "trx.py", _TRX_SCRIPT)
    settings = trx_settings(hostnames, workers, ssh_config)
    python = sys.executable
    out = [
        Contender(setup, "session", "trx session", [python, str(trx_script)], settings, None, scripts),
        Contender(setup, "cold", "trx run()", [python, str(trx_script)], settings, None, scripts),
    ]
    if base is not None:
        sources = sorted(str(p) for p in base.glob("packages/*/src"))
        # inherited by the contender and passed on to its agents and workers (PYTHON* variables)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sources, *filter(None, [os.environ.get("PYTHONPATH")])])}
        label = f"trx@{base.name} run()"
        out.append(Contender(setup, "base", label, [python, str(trx_script)], settings, env, scripts))
    if ssh_config is None:
        elastic = _write(scripts / "elastic.py", _ELASTIC_SCRIPT)
        out.append(Contender(setup, "elastic_launch", "elastic_launch", [python, str(elastic)], {"workers": workers},
                             None, scripts))  # fmt: skip
    if upstream is not None:
        script = _write(scripts / "upstream.py", _UPSTREAM_SCRIPT)
        argv = [str(upstream), str(script)]
        if hosts_file is not None:
            argv = ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c",
                    'hostname launcher && mount --bind "$1" /etc/hosts && shift && exec "$@"', "sh", str(hosts_file),
                    *argv]  # fmt: skip
        up: dict[str, Any] = {"hostnames": hostnames, "workers": workers}
        if ssh_config is not None:
            up["ssh_config_file"] = str(ssh_config)
        # its own torchrunx, not one that a PYTHONPATH would put first
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        out.append(Contender(setup, "upstream-0.4", "upstream-0.4", argv, up, env, scripts))
    return [c for c in out if c.name in wanted]


@contextlib.contextmanager
def ssh_setup(tmp: Path, wanted: list[str], base: Path | None, upstream: Path | None) -> Iterator[
    tuple[list[Contender], Any]
]:  # fmt: skip
    """The contenders on the 2 test-bed hosts x 2 workers, and the bed (to read its hosts' processes).

    Raises the test bed's ``Unavailable`` when it cannot be built (not root, no sshd).
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from multihost import testbed

    with testbed(tmp / "bed", n=2) as bed:
        hosts_file = tmp / "bed" / "etc_hosts"  # launcher, host1, host2: as the hosts see them
        yield contenders_of(SSH_SETUP, bed.aliases, 2, tmp, wanted, base, upstream, bed.ssh_config, hosts_file), bed


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def baseline_tree(revision: str, tmp: Path) -> Path:
    """The packages of `revision`, from ``git archive``, in a folder named by its short hash."""
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", revision], capture_output=True, text=True,
                           check=True, timeout=30).stdout.strip()  # fmt: skip
    tree = tmp / short
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "packages"], capture_output=True,
                             check=True, timeout=120).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True, timeout=120)
    return tree


# ---------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    round: int
    setup: str
    contender: str
    step: str  # "warm run", "start()", "first run", "close()", "cold run()", "repeated run"
    wall_s: float | None  # None: failed
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Idle:
    round: int
    setup: str
    processes: list[ProcMemory]


def session_cycle(c: Contender, r: int, warm_runs: int, idle_pids: Any, out: list[Sample], idle: list[Idle]) -> None:
    """start(), a first run, `warm_runs` runs, the idle session's memory, close()."""
    steps = [("start", "start()"), ("run", "first run")] + [("run", "warm run")] * warm_runs
    for command, step in steps:
        out.append(_step(c, r, command, step))
        if out[-1].wall_s is None and command == "start":
            if (out[-1].error or "").startswith("AttributeError"):  # a torchrunx without sessions
                c.broken = f"no sessions in this torchrunx: {out[-1].error}"
            break
    else:
        time.sleep(IDLE_S)
        idle.append(Idle(r, c.setup, memory_of(idle_pids(c))))
    out.append(_step(c, r, "close", "close()"))


def _step(c: Contender, r: int, command: str, step: str) -> Sample:
    try:
        reply = c.ask(command)
    except CommandFailed as e:
        return Sample(r, c.setup, c.name, step, None, {}, str(e))
    return Sample(r, c.setup, c.name, step, reply["wall"], reply["phases"])


def cycle(c: Contender, r: int, warm_runs: int, idle_pids: Any, idle: list[Idle]) -> list[Sample]:
    """One round of contender `c`: its samples."""
    out: list[Sample] = []
    if c.name == "session":
        session_cycle(c, r, warm_runs, idle_pids, out, idle)
    elif c.name in ("cold", "base"):
        out.append(_step(c, r, "cold", "cold run()"))
    else:
        out.append(_step(c, r, "run", "repeated run"))
    return out


def measure(setups: dict[str, list[Contender]], rounds: int, warm_runs: int, warmup: bool, idle_pids: dict[str, Any],
            log: Path) -> tuple[list[Sample], list[Idle]]:  # fmt: skip
    """Every contender of every setup does its cycle once per round, rotating which one goes first."""
    for contenders in setups.values():
        for c in contenders:
            c.spawn(log)
    samples: list[Sample] = []
    idle: list[Idle] = []
    if warmup:  # untimed: the first launch of each process imports what it needs and reads files from disk
        for setup, contenders in setups.items():
            for c in contenders:
                done = cycle(c, -1, 1, idle_pids[setup], [])
                for s in done:
                    if s.error:
                        print(f"  warm-up {setup} {c.name} {s.step}: {s.error}", flush=True)
        print("warm-up done", flush=True)
    for r in range(rounds):
        for setup, contenders in setups.items():
            live = [c for c in contenders if not c.broken]
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            row = []
            for c in order:
                done = cycle(c, r, warm_runs, idle_pids[setup], idle)
                samples.extend(done)
                for s in done:
                    if s.error:
                        print(f"  {setup} {c.name} {s.step} failed: {s.error}", flush=True)
                timed = [s.wall_s for s in done if s.wall_s is not None and s.step != "close()"]
                row.append(f"{c.name} " + "/".join(f"{t:.2f}" for t in timed) if timed else f"{c.name} FAILED")
            print(f"round {r + 1}/{rounds} {setup:<8} " + ", ".join(row) + f"  (load {os.getloadavg()[0]:.1f})",
                  flush=True)  # fmt: skip
    return samples, idle


# ---------------------------------------------------------------------------------------------
# Table, phases, memory, targets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    setup: str
    contender: str
    step: str
    median: float
    low: float
    high: float
    count: int
    failed: int
    phases: dict[str, float]  # median per phase


def summarize(samples: list[Sample]) -> dict[tuple[str, str, str], Summary]:
    """Per (setup, contender, step): median, min and max of the successful samples, median of each phase;
    plus "start+first" for sessions: start() and the first run of the same round, added."""
    extra = []
    for s in samples:
        if s.step == "first run":
            start = next((t for t in samples if (t.round, t.setup, t.contender, t.step) ==
                          (s.round, s.setup, s.contender, "start()")), None)  # fmt: skip
            total = None if start is None or start.wall_s is None or s.wall_s is None else start.wall_s + s.wall_s
            extra.append(Sample(s.round, s.setup, s.contender, "start+first", total))
    samples = samples + extra
    out = {}
    for key in dict.fromkeys((s.setup, s.contender, s.step) for s in samples):
        mine = [s for s in samples if (s.setup, s.contender, s.step) == key]
        walls = [s.wall_s for s in mine if s.wall_s is not None]
        if not walls:
            continue
        names = list(dict.fromkeys(p for s in mine for p in s.phases))
        phases = {p: statistics.median(s.phases[p] for s in mine if p in s.phases) for p in names}
        out[key] = Summary(*key, statistics.median(walls), min(walls), max(walls), len(walls), len(mine) - len(walls),
                           phases)  # fmt: skip
    return out


STEP_ORDER = ("warm run", "start()", "first run", "start+first", "close()", "cold run()", "repeated run")


def ratio(summaries: dict[tuple[str, str, str], Summary], key: tuple[str, str, str], ref: tuple[str, str, str]) -> (
    float | None
):  # fmt: skip
    ours, theirs = summaries.get(key), summaries.get(ref)
    return None if ours is None or theirs is None else ours.median / theirs.median


def print_table(summaries: dict[tuple[str, str, str], Summary], labels: dict[str, str]) -> None:
    print(f"{'setup':<9}{'contender':<20}{'step':<14}{'median':>9}{'min-max':>15}{'n':>4}{'x elastic':>11}"
          f"{'x upstream':>12}")  # fmt: skip
    rows = sorted(summaries, key=lambda k: (_setup_order(k[0]), CONTENDERS.index(k[1]), STEP_ORDER.index(k[2])))
    for key in rows:
        s = summaries[key]
        setup = key[0]
        cells = [
            f"{setup:<9}{labels[s.contender]:<20}{s.step:<14}{_seconds(s.median):>9}"
            f"{_seconds(s.low) + '-' + _seconds(s.high):>15}{s.count:>4}",
            _ratio_cell(ratio(summaries, key, (setup, "elastic_launch", "repeated run")), 11),
            _ratio_cell(ratio(summaries, key, (setup, "upstream-0.4", "repeated run")), 12),
        ]
        failed = f"   ({s.failed} of {s.count + s.failed} failed)" if s.failed else ""
        print("".join(cells) + failed)


def _setup_order(setup: str) -> tuple[int, str]:
    return (1, setup) if setup == SSH_SETUP else (0, f"{int(setup[2:]):04d}")


def _seconds(value: float) -> str:
    return f"{value:.3f}s" if value < 10 else f"{value:.1f}s"


def _ratio_cell(value: float | None, width: int) -> str:
    return f"{value:>{width - 1}.3f}x" if value is not None else f"{'-':>{width}}"


def print_phases(summaries: dict[tuple[str, str, str], Summary], samples: list[Sample]) -> None:
    """Median seconds from the start of a run to the end of each phase it reports; and one warm run's phases."""
    keys = [k for k in summaries if k[1] in ("session", "cold", "base") and summaries[k].phases]
    if not keys:
        print("phases: none reported")
        return
    names = list(dict.fromkeys(p for k in keys for p in summaries[k].phases))
    print("phases (LaunchResult.phases: seconds from the start of the run to the end of each phase, medians)")
    print(f"{'setup':<9}{'contender':<10}{'step':<14}" + "".join(f"{p:>17}" for p in names))
    for key in sorted(keys, key=lambda k: (_setup_order(k[0]), CONTENDERS.index(k[1]), STEP_ORDER.index(k[2]))):
        phases = summaries[key].phases
        print(f"{key[0]:<9}{key[1]:<10}{key[2]:<14}" + "".join(
            f"{phases[p]:>17.4f}" if p in phases else f"{'':>17}" for p in names))  # fmt: skip
    for setup in dict.fromkeys(s.setup for s in samples):
        last = [s for s in samples if (s.setup, s.contender, s.step) == (setup, "session", "warm run") and s.phases]
        if last:
            print(f"one warm run's phases, {setup}: {last[-1].phases} (run() took {last[-1].wall_s:.4f} s)")


def print_memory(idle: list[Idle]) -> None:
    for setup in dict.fromkeys(i.setup for i in idle):
        mine = [i for i in idle if i.setup == setup and i.processes]
        if not mine:
            continue
        totals = [sum(p.rss_mib for p in i.processes) for i in mine]
        print(
            f"idle session, {setup}: {len(mine[-1].processes)} processes, RSS {statistics.median(totals):.1f} MiB "
            f"in all (median of {len(totals)} rounds; PSS {_pss(mine[-1].processes)}); the last round's:"
        )
        for p in mine[-1].processes:
            pss = f"{p.pss_mib:7.1f}" if p.pss_mib is not None else "      ?"
            print(f"    pid {p.pid:>7}  RSS {p.rss_mib:7.1f} MiB  PSS {pss} MiB  {p.command}")


def _pss(processes: list[ProcMemory]) -> str:
    known = [p.pss_mib for p in processes if p.pss_mib is not None]
    return f"{sum(known):.1f} MiB" if known else "unknown"


# (setup, limit in seconds, limit over elastic_launch's repeated run): the session's warm runs, medians
WARM_TARGETS = (("N=2", 0.1, 0.05), ("N=4", 0.1, 0.05), (SSH_SETUP, 0.15, None))
COLD_TOLERANCE = 1.10  # "no slower than today", allowing for the noise of a loaded machine


def print_targets(summaries: dict[tuple[str, str, str], Summary]) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []

    def verdict(name: str, value: float | None, limit: float, unit: str) -> None:
        state = "not measured" if value is None else "met" if value <= limit else "missed"
        shown = "" if value is None else f" ({value:.3f}{unit})"
        print(f"target {name} <= {limit:g}{unit}: {state}{shown}")
        verdicts.append({"target": name, "limit": limit, "value": value, "verdict": state})

    for setup, seconds, over_elastic in WARM_TARGETS:
        warm = summaries.get((setup, "session", "warm run"))
        verdict(f"{setup} warm run median", None if warm is None else warm.median, seconds, " s")
        if over_elastic is not None:
            value = ratio(summaries, (setup, "session", "warm run"), (setup, "elastic_launch", "repeated run"))
            verdict(f"{setup} warm run / elastic_launch", value, over_elastic, "x")
    for setup in sorted(dict.fromkeys(k[0] for k in summaries), key=_setup_order):
        base = (setup, "base", "cold run()")
        for key, name in (((setup, "cold", "cold run()"), "cold run()"), ((setup, "session", "start+first"),
                                                                         "session start()+first run")):  # fmt: skip
            verdict(f"{setup} {name} / base cold run()", ratio(summaries, key, base), COLD_TOLERANCE, "x")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5, at least 5 for a report)")
    parser.add_argument("--warm-runs", type=int, default=3, help="warm runs per session and round (default 3)")
    parser.add_argument("--workers", default="2,4", help="local setups: workers on localhost, comma-separated "
                        "(default 2,4; empty for none)")  # fmt: skip
    parser.add_argument("--ssh", action="store_true", help="also the 2 test-bed hosts x 2 workers over SSH (root)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument("--baseline", default=BASELINE, help=f"revision of the 'base' contender (default {BASELINE}, "
                        "the last commit before sessions; empty for none)")  # fmt: skip
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first cycle of each contender")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, N=2 only, 1 warm run, no warm-up")
    parser.add_argument("--json", type=Path, help="write the raw samples, medians, memory and verdicts to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.workers, args.warm_runs, args.no_warmup = 1, "2", 1, True
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(wanted) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {','.join(CONTENDERS)}")
    if not args.baseline:
        wanted = [c for c in wanted if c != "base"]

    upstream = None
    if "upstream-0.4" in wanted:
        try:
            upstream = _upstream.upstream_python()
        except _upstream.UpstreamUnavailable as e:
            print(f"upstream-0.4: unavailable ({e})")

    load_before = os.getloadavg()
    left: dict[str, int] = {}
    bed_left: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-session-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        base = baseline_tree(args.baseline, tmp) if "base" in wanted else None
        setups = {f"N={n}": contenders_of(f"N={n}", ["localhost"], n, tmp, wanted, base, upstream) for n in workers}
        # the idle session's agents: on localhost its process's descendants; over SSH what runs on the hosts
        idle_pids: dict[str, Any] = {s: (lambda c: _descendants(c.proc.pid)) for s in setups}
        bed = None
        if args.ssh:
            try:
                setups[SSH_SETUP], bed = stack.enter_context(ssh_setup(tmp, wanted, base, upstream))
            except Exception as e:  # the bed's Unavailable, or a failure to build it
                print(f"{SSH_SETUP}: unavailable ({type(e).__name__}: {e})")
            else:
                idle_pids[SSH_SETUP] = lambda c: sorted(
                    int(row.split()[0]) for rows in bed.leftover_processes().values() for row in rows
                )
        labels = {c.name: c.label for cs in setups.values() for c in cs}
        log = tmp / "output.log"
        print(f"contenders' own output: {log} (removed at the end)", flush=True)
        try:
            samples, idle = measure({k: v for k, v in setups.items() if v}, args.rounds, args.warm_runs,
                                    not args.no_warmup, idle_pids, log)  # fmt: skip
        finally:
            for contenders in setups.values():
                for c in contenders:
                    if c.proc is not None and (n := c.quit()):
                        left[f"{c.setup} {c.name}"] = n
            if bed is not None:
                bed_left = bed.wait_no_leftovers()
        broken = {f"{c.setup} {c.name}": c.broken for cs in setups.values() for c in cs if c.broken}
    load_after = os.getloadavg()

    print(
        f"\nwarm sessions, one process per contender: {args.rounds} rounds x {args.warm_runs} warm runs, "
        f"{socket.gethostname()}, {os.cpu_count()} cores, load {load_before[0]:.2f} at start / {load_after[0]:.2f} "
        f"at end, python {sys.version.split()[0]}, torch {package_version('torch')}, torchrunx at {checkout()}"
        + (f", base = {args.baseline}" if base is not None else "")
    )
    for who, why in broken.items():
        print(f"{who}: left out ({why})")
    if SSH_SETUP in setups or args.ssh:
        print(f"{SSH_SETUP}: elastic_launch has no SSH form; compared against upstream 0.4 over SSH only")
    summaries = summarize(samples)
    print_table(summaries, labels)
    print()
    print_phases(summaries, samples)
    print()
    print_memory(idle)
    print()
    verdicts = print_targets(summaries)
    for who, n in left.items():
        print(f"ANOMALY: {n} processes of {who} still alive 5 s after it ended (killed)")
    if bed_left:
        print(f"ANOMALY: processes left on the test-bed hosts: {bed_left}")
    if args.json:
        args.json.write_text(json.dumps({
            "meta": {"rounds": args.rounds, "warm_runs": args.warm_runs, "cores": os.cpu_count(),
                     "load_before": load_before, "load_after": load_after, "torch": package_version("torch"),
                     "torchrunx_at": checkout(), "baseline": args.baseline if base is not None else None},
            "samples": [asdict(s) for s in samples],
            "summary": [asdict(s) for s in summaries.values()],
            "idle": [asdict(i) for i in idle],
            "targets": verdicts,
        }, indent=1))  # fmt: skip
        print(f"raw samples written to {args.json}")


if __name__ == "__main__":
    main()
