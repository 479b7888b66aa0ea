#!/usr/bin/env python
"""Whole-process cold start: a fresh interpreter per sample, as users run their launch scripts.

Every sample is ``subprocess.Popen([python, script.py])`` (or ``python -c``) timed from the
spawn to the exit of that process, with the page cache warm but nothing imported. Within a
round, every contender of a setup runs once, and which contender goes first rotates from
round to round. Contenders:

- ``floor``: ``python -c "import torch"``, the least any torch launch can cost;
- ``trx-seed``: a script as on the getting-started page, which never imports torch itself:
  ``import torchrunx as trx``, then ``trx.launch(noop, hostnames=["localhost"],
  workers_per_host=N, backend="gloo", logs=None, log_console=None)``;
- ``trx-torch-first``: the same script with ``import torch`` at its top;
- ``torchrun``: ``python -m torch.distributed.run --standalone --nproc-per-node N`` on a script
  that initialises a gloo process group, passes a barrier and destroys the group (the work
  torchrunx's workers do around a function);
- ``elastic_launch``: a script calling ``torch.distributed.launcher.api.elastic_launch`` (c10d
  rendezvous on ``localhost:0``, ``max_restarts=0``, defaults otherwise) on an entrypoint doing
  the same gloo init, barrier and destroy;
- ``upstream-0.4``: torchrunx 0.4 from PyPI in its own environment (``benchmarks/.venv-upstream``,
  created on first use, see ``_upstream.py``): ``trx.Launcher(hostnames=["localhost"],
  workers_per_host=N, backend="gloo").set_logging_handlers(None).run(noop)``.

Setups: N=1, 2, 4 workers on localhost (``--workers``), and with ``--ssh`` (root) 2 hosts x 2
workers on the network-namespace test bed of ``tests/multihost.py``: ``trx-seed`` with the bed's
ssh config, and torchrun started with ``ssh`` on both hosts as ``bench_multihost.py`` does it.

The scripts that launch from Python print wall-clock stamps when their imports are done and when
the launch returned; with the spawn and exit times seen here, they split each sample into phases
(``import``, ``launch``, ``exit``). `agent_phases` is where phases reported by torchrunx itself
(agent started, torch imported, workers forked, group formed) are to be read, once it reports them.

Prints per setup and contender the median, min-max and the ratios of medians to the floor and to
torchrun, then whether the cold-start targets hold. A measuring tool, not a test: exits 0 whatever
the numbers are.

Run from the repository root:  ./dev hatch run python benchmarks/bench_coldstart.py [--rounds 5] [--ssh]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _upstream
from _provenance import checkout, package_version

SAMPLE_TIMEOUT_S = 300.0
STAMP = "@@coldstart"  # marks the line with the launch script's own time stamps on its output
SSH_SETUP = "ssh 2x2"
CONTENDERS = ("floor", "trx-seed", "trx-torch-first", "torchrun", "elastic_launch", "upstream-0.4")

# Launch scripts. They read no arguments: each is written out for one setup. `time` is the only
# module imported before the measured imports, so the first stamp covers the launcher's imports.

_TRX_SCRIPT = """\
import time
{torch_import}import torchrunx as trx

imported = time.time()


def noop():
    pass


if __name__ == "__main__":
    result = trx.launch(noop, hostnames={hostnames!r}, workers_per_host={workers}, backend="gloo", logs=None,
                        log_console=None, {ssh_config})
    phases = getattr(result, "phases", {{}})  # torchrunx's own start-up phases, where it reports them
    print("{stamp}", imported, time.time(), *(f"{{k.replace(' ', '_')}}={{v}}" for k, v in phases.items()), flush=True)
"""

_UPSTREAM_SCRIPT = """\
import time
import torchrunx as trx

imported = time.time()


def noop():
    pass


if __name__ == "__main__":
    launcher = trx.Launcher(hostnames=["localhost"], workers_per_host={workers}, backend="gloo")
    launcher.set_logging_handlers(None).run(noop)
    print("{stamp}", imported, time.time(), flush=True)
"""

_TORCHRUN_WORKER = """\
import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
"""

_ELASTIC_SCRIPT = """\
import time
import uuid
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

imported = time.time()


def entrypoint():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node={workers}, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=uuid.uuid4().hex, max_restarts=0)
    elastic_launch(config, entrypoint)()
    print("{stamp}", imported, time.time(), flush=True)
"""


class SampleFailed(Exception):
    """A contender's process failed or timed out; the message says how."""


@dataclass(frozen=True)
class Measured:
    wall_s: float
    phases: dict[str, float] = field(default_factory=dict)


Runner = Callable[[Path], Measured]  # gets a scratch directory of its own for the sample
Leftovers = Callable[[], dict[str, list[str]]]  # per test-bed host, the processes still running there


@dataclass(frozen=True)
class Sample:
    round: int
    setup: str
    contender: str
    wall_s: float | None  # None: the sample failed
    phases: dict[str, float]
    error: str | None = None


def agent_phases(scratch: Path, spawned: float) -> dict[str, float]:
    """More phase timings from files a launch leaves in `scratch` (none today: torchrunx's own
    phases come on the script's stamp line, from `LaunchResult.phases`; see `script_phases`)."""
    return {}


def script_phases(output: str, spawned: float, ended: float) -> dict[str, float]:
    """Split a sample at the launch script's stamps: imports done, launch returned."""
    for line in output.splitlines():
        if line.startswith(STAMP):
            words = line.split()
            imported, returned = float(words[1]), float(words[2])
            phases = {"import": imported - spawned, "launch": returned - imported, "exit": ended - returned}
            # LaunchResult.phases: seconds from the launch call to the end of each start-up phase
            for word in words[3:]:
                name, _, value = word.partition("=")
                if name in _REPORTED:
                    phases[_REPORTED[name]] = float(value)
            return phases
    return {}


# The start-up phases torchrunx reports (LaunchResult.phases), as short column names: agents
# started (by their executor), torch imported in every agent (they are ready), workers forked,
# process group formed. Seconds from the launch call.
_REPORTED = {"agents_started": "agents", "agents_ready": "torch", "workers_started": "forked", "group_formed": "group"}


def process_runner(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Runner:
    """Time one fresh process from spawn to exit; its output goes to a file (no pipe to drain)."""

    def run(scratch: Path) -> Measured:
        output = scratch / "output.txt"
        with output.open("wb") as out:
            spawned = time.time()
            start = time.perf_counter()
            # A session of its own, so that whatever the launch leaves behind can be found and ended.
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                returncode = proc.wait(timeout=SAMPLE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _end_group(proc.pid, grace=0)
                raise SampleFailed(f"no exit after {SAMPLE_TIMEOUT_S:.0f} s") from None
            wall = time.perf_counter() - start
            ended = time.time()
        left = _end_group(proc.pid, grace=5.0)  # out of the timing: only so they cannot slow the next sample
        text = output.read_text(errors="replace")
        if returncode != 0:
            raise SampleFailed(f"exit status {returncode}: {_tail(text)}")
        if left:
            raise SampleFailed(f"processes of the launch still alive 5 s after it exited: {left}")
        return Measured(wall, {**script_phases(text, spawned, ended), **agent_phases(scratch, spawned)})

    return run


def call_runner(fn: Callable[[], None]) -> Runner:
    """Time a call that starts and waits for processes itself (torchrun over ``ssh``)."""

    def run(scratch: Path) -> Measured:
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:
            raise SampleFailed(f"{type(e).__name__}: {_tail(str(e))}") from None
        return Measured(time.perf_counter() - start)

    return run


def _end_group(pgid: int, grace: float) -> int:
    """Wait up to `grace` seconds for process group `pgid` to be gone, then SIGKILL it; how many were left."""
    deadline = time.monotonic() + grace
    while True:
        members = _group_members(pgid)
        if not members:
            return 0
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return len(members)
        time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "no output"


# ---------------------------------------------------------------------------------------------
# Contenders per setup
# ---------------------------------------------------------------------------------------------


def local_contenders(workers: int, tmp: Path, wanted: list[str], upstream: Path | None) -> dict[str, Runner]:
    """The runners of every wanted contender with `workers` workers on localhost."""
    python = sys.executable
    scripts = tmp / f"n{workers}"
    scripts.mkdir()
    runners: dict[str, Runner] = {"floor": process_runner([python, "-c", "import torch"], scripts)}
    for name, torch_import in (("trx-seed", ""), ("trx-torch-first", "import torch\n")):
        script = _write(scripts / f"{name}.py", _TRX_SCRIPT, torch_import=torch_import, hostnames=["localhost"],
                        workers=workers, ssh_config="")  # fmt: skip
        runners[name] = process_runner([python, str(script)], scripts)
    worker = _write(scripts / "torchrun_worker.py", _TORCHRUN_WORKER)
    runners["torchrun"] = process_runner(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers), str(worker)], scripts
    )
    elastic = _write(scripts / "elastic.py", _ELASTIC_SCRIPT, workers=workers)
    runners["elastic_launch"] = process_runner([python, str(elastic)], scripts)
    if upstream is not None:
        script = _write(scripts / "upstream.py", _UPSTREAM_SCRIPT, workers=workers)
        # its own torchrunx, not one that a PYTHONPATH (see --trx-src) puts first
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        runners["upstream-0.4"] = process_runner([str(upstream), str(script)], scripts, env)
    return {name: runner for name, runner in runners.items() if name in wanted}


@contextlib.contextmanager
def ssh_contenders(tmp: Path, wanted: list[str]) -> Iterator[tuple[dict[str, Runner], Leftovers]]:
    """Runners on 2 test-bed hosts x 2 workers, and a function listing processes left on the hosts.

    Raises the test bed's ``Unavailable`` when it cannot be built (not root, no sshd).
    """
    # bench_multihost imports torch and the test bed; only this setup pays for that.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from bench_multihost import torchrun_over_ssh

    from multihost import testbed

    scripts = tmp / "ssh"
    scripts.mkdir()
    with testbed(tmp / "bed", n=2) as bed:
        python = sys.executable
        runners: dict[str, Runner] = {"floor": process_runner([python, "-c", "import torch"], scripts)}
        seed = _write(scripts / "trx-seed.py", _TRX_SCRIPT, torch_import="", hostnames=bed.aliases, workers=2,
                      ssh_config=f"ssh_config_file={str(bed.ssh_config)!r}")  # fmt: skip
        runners["trx-seed"] = process_runner([python, str(seed)], scripts)
        worker = _write(scripts / "torchrun_worker.py", _TORCHRUN_WORKER)
        runners["torchrun"] = call_runner(torchrun_over_ssh(bed, worker))
        yield {name: runner for name, runner in runners.items() if name in wanted}, bed.wait_no_leftovers


def _write(path: Path, template: str, **values: object) -> Path:
    path.write_text(template.format(stamp=STAMP, **values))
    return path


# ---------------------------------------------------------------------------------------------
# Rounds, table, targets
# ---------------------------------------------------------------------------------------------


def measure(setups: dict[str, dict[str, Runner]], rounds: int, warmup: bool, tmp: Path) -> list[Sample]:
    """Every contender of every setup once per round, rotating which one goes first."""
    scratch = tmp / "scratch"
    scratch.mkdir()
    if warmup:  # untimed, once per contender: the first run of each reads its files from disk
        seen: set[str] = set()
        for setup, runners in setups.items():
            for name, runner in runners.items():
                if name not in seen or setup == SSH_SETUP:
                    seen.add(name)
                    with contextlib.suppress(SampleFailed):
                        runner(scratch)
        print("warm-up done", flush=True)
    samples = []
    for r in range(rounds):
        for setup, runners in setups.items():
            names = list(runners)
            order = names[r % len(names) :] + names[: r % len(names)]
            row = []
            for name in order:
                try:
                    measured = runners[name](scratch)
                    samples.append(Sample(r, setup, name, measured.wall_s, measured.phases))
                    row.append(f"{name} {measured.wall_s:.2f}")
                except SampleFailed as e:
                    samples.append(Sample(r, setup, name, None, {}, str(e)))
                    row.append(f"{name} FAILED")
                    print(f"  {setup} {name} failed: {e}", flush=True)
            print(f"round {r + 1}/{rounds} {setup:<8} " + ", ".join(row) + f"  (load {os.getloadavg()[0]:.1f})",
                  flush=True)  # fmt: skip
    return samples


@dataclass(frozen=True)
class Summary:
    setup: str
    contender: str
    median: float
    low: float
    high: float
    count: int
    failed: int
    phases: dict[str, float]  # median per phase


def summarize(samples: list[Sample]) -> dict[tuple[str, str], Summary]:
    """Per (setup, contender): median, min and max of the successful samples, median of each phase."""
    keys = list(dict.fromkeys((s.setup, s.contender) for s in samples))
    out = {}
    for setup, name in keys:
        mine = [s for s in samples if (s.setup, s.contender) == (setup, name)]
        walls = [s.wall_s for s in mine if s.wall_s is not None]
        if not walls:
            continue
        phase_names = list(dict.fromkeys(p for s in mine for p in s.phases))
        phases = {p: statistics.median(s.phases[p] for s in mine if p in s.phases) for p in phase_names}
        out[setup, name] = Summary(setup, name, statistics.median(walls), min(walls), max(walls), len(walls),
                                   len(mine) - len(walls), phases)  # fmt: skip
    return out


def ratio(summaries: dict[tuple[str, str], Summary], setup: str, name: str, reference: str) -> float | None:
    ours, ref = summaries.get((setup, name)), summaries.get((setup, reference))
    return None if ours is None or ref is None else ours.median / ref.median


def print_table(summaries: dict[tuple[str, str], Summary]) -> None:
    phase_names = list(dict.fromkeys(p for s in summaries.values() for p in s.phases))
    header = f"{'setup':<9}{'contender':<17}{'median':>9}{'min-max':>15}{'x floor':>9}{'x torchrun':>11}"
    print(header + "".join(f"{p:>9}" for p in phase_names) + "   (phases: medians, s)")
    for (setup, name), s in summaries.items():
        cells = [
            f"{setup:<9}{name:<17}{s.median:>8.2f}s{f'{s.low:.2f}-{s.high:.2f}s':>15}",
            _ratio_cell(ratio(summaries, setup, name, "floor"), 9),
            _ratio_cell(ratio(summaries, setup, name, "torchrun"), 11),
            *(f"{s.phases[p]:>9.2f}" if p in s.phases else f"{'':>9}" for p in phase_names),
        ]
        failed = f"   ({s.failed} of {s.count + s.failed} failed)" if s.failed else ""
        print(("".join(cells) + failed).rstrip())


def _ratio_cell(value: float | None, width: int) -> str:
    return f"{value:>{width - 1}.2f}x" if value is not None else f"{'-':>{width}}"


# (setup, reference, limit): the median of trx-seed over that of the reference, at most `limit`
TARGETS = (("N=2", "floor", 1.35), ("N=2", "torchrun", 0.6), ("N=4", "floor", 1.5), (SSH_SETUP, "floor", 1.6))


def print_targets(summaries: dict[tuple[str, str], Summary]) -> list[dict[str, object]]:
    verdicts = []
    for setup, reference, limit in TARGETS:
        value = ratio(summaries, setup, "trx-seed", reference)
        verdict = "not measured" if value is None else "met" if value <= limit else "missed"
        shown = "" if value is None else f" ({value:.2f}x)"
        print(f"target {setup} trx-seed <= {limit}x {reference}: {verdict}{shown}")
        verdicts.append({"setup": setup, "reference": reference, "limit": limit, "ratio": value, "verdict": verdict})
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of samples (default 5, at least 5 for a report)")
    parser.add_argument("--workers", default="1,2,4", help="local setups: workers on localhost, comma-separated "
                        "(default 1,2,4; empty for none)")  # fmt: skip
    parser.add_argument("--ssh", action="store_true", help="also 2 SSH hosts x 2 workers on the test bed (root)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of each contender")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, N=2 only, no warm-up")
    parser.add_argument("--json", type=Path, help="write the raw samples, medians and verdicts to this file")
    parser.add_argument("--trx-src", type=Path, help="measure the torchrunx packages of this source tree (its "
                        "packages/*/src go first on PYTHONPATH), e.g. a `git archive` of another commit")  # fmt: skip
    args = parser.parse_args()
    if args.trx_src:
        sources = sorted(str(p) for p in args.trx_src.resolve().glob("packages/*/src"))
        if not sources:
            parser.error(f"--trx-src {args.trx_src}: no packages/*/src there")
        # inherited by every contender's process and forwarded to agents (PYTHON* variables)
        os.environ["PYTHONPATH"] = os.pathsep.join([*sources, *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.quick:
        args.rounds, args.workers, args.no_warmup = 1, "2", True
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(wanted) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {','.join(CONTENDERS)}")

    upstream = None
    if "upstream-0.4" in wanted and workers:
        try:
            upstream = _upstream.upstream_python()
        except _upstream.UpstreamUnavailable as e:
            print(f"upstream-0.4: unavailable ({e})")

    load_before = os.getloadavg()
    leftovers: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        setups = {f"N={n}": local_contenders(n, tmp, wanted, upstream) for n in workers}
        find_leftovers = None
        if args.ssh:
            try:
                setups[SSH_SETUP], find_leftovers = stack.enter_context(ssh_contenders(tmp, wanted))
            except Exception as e:  # the bed's Unavailable, or a failure to build it
                print(f"{SSH_SETUP}: unavailable ({type(e).__name__}: {e})")
        samples = measure({k: v for k, v in setups.items() if v}, args.rounds, not args.no_warmup, tmp)
        if find_leftovers is not None:
            leftovers = find_leftovers()
    load_after = os.getloadavg()

    print(
        f"\ncold start, one fresh interpreter per sample: {args.rounds} rounds, {socket.gethostname()}, "
        f"{os.cpu_count()} cores, load {load_before[0]:.2f} at start / {load_after[0]:.2f} at end, "
        f"python {sys.version.split()[0]}, torch {package_version('torch')}, torchrunx {package_version('torchrunx')} "
        f"from {args.trx_src or checkout()}"
    )
    summaries = summarize(samples)
    print_table(summaries)
    print()
    verdicts = print_targets(summaries)
    if leftovers:
        print(f"ANOMALY: processes left on the test-bed hosts: {leftovers}")
    if args.json:
        args.json.write_text(json.dumps({
            "meta": {"rounds": args.rounds, "cores": os.cpu_count(), "load_before": load_before,
                     "load_after": load_after, "torch": package_version("torch"),
                     "torchrunx_from": str(args.trx_src or checkout())},
            "samples": [asdict(s) for s in samples],
            "summary": [asdict(s) for s in summaries.values()],
            "targets": verdicts,
        }, indent=1))  # fmt: skip
        print(f"raw samples written to {args.json}")


if __name__ == "__main__":
    main()
