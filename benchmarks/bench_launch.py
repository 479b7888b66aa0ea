#!/usr/bin/env python
"""Launch-path benchmark: torchrunx vs torch's own ``elastic_launch``, in one process.

Measures, alternating between the launchers, with ``--reps`` repetitions each:

1. ``cold N=1/2/4``   wall time of a no-op run (process group initialised, gloo) from the
                       call to its return;
2. ``SIGKILL->exc``   a worker SIGKILLs itself after the group is up; time from the kill
                       (timestamp written by the worker just before) to the exception
                       caught in the launcher;
3. ``raise->exc``     rank 1 raises while rank 0 is blocked in ``dist.barrier()``; time from
                       the raise (timestamp in the worker) to the exception in the launcher;
4. ``100MB return``   rank 0 returns ``torch.ones(25 * 2**20)`` (100 MB float32); time from
                       the worker's ``return`` (timestamp right before it) to the value
                       being available in the launcher;
5. ``PSS / CPU``      peak memory (sum of PSS over the processes the launch spawned, sampled
                       every 20 ms from /proc/<pid>/smaps_rollup) and CPU seconds
                       (``getrusage(RUSAGE_CHILDREN)`` delta) of a 4-worker no-op run.

Run:  python benchmarks/bench_launch.py [--reps 5] [--quick] [--json out.json]

This is a measuring tool, not a test: it exits 0 whether or not the targets are met
(pass ``--strict`` to exit 1 when a target fails). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------
# Worker-side functions. Module-level so that elastic_launch (spawn start method) can
# import them from __mp_main__; torchrunx ships them with cloudpickle.
# ---------------------------------------------------------------------------------------

BIG_NUMEL = 25 * 2**20  # float32 -> 100 MiB


def _stamp(path: str) -> None:
    with open(path, "w") as f:
        f.write(repr(time.time()))


def w_noop() -> None:
    return None


def w_sigkill(ts_path: str, killer: int) -> None:
    """Rank `killer` SIGKILLs itself once the group is up; the others wait (a long sleep)."""
    if dist.get_rank() == killer:
        _stamp(ts_path)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)


def w_raise_blocked(ts_path: str) -> None:
    """Rank 1 raises while rank 0 sits in dist.barrier() (which rank 1 never joins)."""
    if dist.get_rank() == 1:
        time.sleep(0.3)  # let rank 0 get into the barrier
        _stamp(ts_path)
        raise ValueError("bench_launch: deliberate failure on rank 1")
    dist.barrier()


def w_return_big(ts_path: str) -> Any:
    if dist.get_rank() == 0:
        value = torch.ones(BIG_NUMEL)
        _stamp(ts_path)
        return value
    return None


WORKER_FUNCS: dict[str, Callable[..., Any]] = {
    "noop": w_noop,
    "sigkill": w_sigkill,
    "raise_blocked": w_raise_blocked,
    "return_big": w_return_big,
}


def elastic_entry(name: str, kwargs: dict[str, Any]) -> Any:
    """elastic_launch's entrypoint: elastic only sets the env, so the worker opens the group
    itself (what torchrunx does for its workers before calling the function)."""
    dist.init_process_group("gloo")
    try:
        return WORKER_FUNCS[name](**kwargs)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Launchers under test
# ---------------------------------------------------------------------------------------


class Launcher:
    name = ""
    expected_failure: tuple[type[BaseException], ...] = ()

    def run(self, func_name: str, kwargs: dict[str, Any], nproc: int) -> dict[int, Any]:
        raise NotImplementedError


class TorchrunxLauncher(Launcher):
    name = "torchrunx"

    def __init__(self) -> None:
        import torchrunx as trx

        self.trx = trx
        self.expected_failure = (trx.WorkerFailedError, ValueError)

    def run(self, func_name: str, kwargs: dict[str, Any], nproc: int) -> dict[int, Any]:
        results = self.trx.launch(
            WORKER_FUNCS[func_name],
            kwargs,
            hostnames=["localhost"],
            workers_per_host=nproc,
            backend="gloo",
            logs=None,
        )
        return dict(results)


class ElasticLauncher(Launcher):
    def __init__(self, monitor_interval: float, name: str) -> None:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        self.monitor_interval = monitor_interval
        self.name = name
        self.expected_failure = (ChildFailedError,)

    def run(self, func_name: str, kwargs: dict[str, Any], nproc: int) -> dict[int, Any]:
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            run_id=f"bench-{uuid.uuid4().hex[:12]}",
            max_restarts=0,
            monitor_interval=self.monitor_interval,
        )
        saved_env = dict(os.environ)
        try:
            return dict(elastic_launch(config, elastic_entry)(func_name, kwargs))
        finally:
            # elastic_launch exports TORCHELASTIC_* variables into this process; torchrunx
            # forwards TORCH* to its workers, so do not let one launcher leak into the other.
            os.environ.clear()
            os.environ.update(saved_env)


# ---------------------------------------------------------------------------------------
# Process-tree sampling
# ---------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = _children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(_children(p))
    return found


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeSampler:
    """Every `interval` s: PSS summed over the descendants of this process that did not
    exist when sampling started (the launch's agents/workers/helpers), and this process's
    own PSS. Keeps the peaks."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.me = os.getpid()
        self.preexisting = set(descendants(self.me))
        self.peak_children_kib = 0
        self.peak_total_kib = 0
        self.max_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        pids = [p for p in descendants(self.me) if p not in self.preexisting]
        children = sum(pss_kib(p) for p in pids)
        total = children + pss_kib(self.me)
        self.peak_children_kib = max(self.peak_children_kib, children)
        self.peak_total_kib = max(self.peak_total_kib, total)
        self.max_procs = max(self.max_procs, len(pids))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


@dataclass
class Ctx:
    tmp: str
    noise_fd: int  # where launch output goes (the launchers' and workers' stdout/stderr)
    anomalies: list[str] = field(default_factory=list)


@contextlib.contextmanager
def redirected_output(fd: int) -> Iterator[None]:
    """Send fd 1/2 (launcher rendering, elastic workers' inherited output) to `fd`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _read_stamp(path: str) -> float:
    with open(path) as f:
        return float(f.read())


def m_cold(launcher: Launcher, ctx: Ctx, nproc: int) -> float:
    with redirected_output(ctx.noise_fd):
        t0 = time.perf_counter()
        launcher.run("noop", {}, nproc)
        return time.perf_counter() - t0


def _failure_latency(launcher: Launcher, ctx: Ctx, func: str, kwargs: dict[str, Any], nproc: int) -> float:
    ts_path = kwargs["ts_path"]
    with redirected_output(ctx.noise_fd):
        try:
            launcher.run(func, kwargs, nproc)
        except BaseException as e:
            t_caught = time.time()
            if not isinstance(e, launcher.expected_failure) or isinstance(e, KeyboardInterrupt):
                if isinstance(e, KeyboardInterrupt):
                    raise
                ctx.anomalies.append(f"{launcher.name} {func}: unexpected {type(e).__name__}: {e}")
        else:
            raise RuntimeError(f"{launcher.name} {func}: the run did not fail")
    return t_caught - _read_stamp(ts_path)


def m_sigkill(launcher: Launcher, ctx: Ctx) -> float:
    path = os.path.join(ctx.tmp, f"kill-{uuid.uuid4().hex}")
    return _failure_latency(launcher, ctx, "sigkill", {"ts_path": path, "killer": 1}, 2)


def m_raise(launcher: Launcher, ctx: Ctx) -> float:
    path = os.path.join(ctx.tmp, f"raise-{uuid.uuid4().hex}")
    return _failure_latency(launcher, ctx, "raise_blocked", {"ts_path": path}, 2)


def m_return_big(launcher: Launcher, ctx: Ctx) -> float:
    path = os.path.join(ctx.tmp, f"ret-{uuid.uuid4().hex}")
    with redirected_output(ctx.noise_fd):
        results = launcher.run("return_big", {"ts_path": path}, 2)
        value = results[0]
        t_available = time.time()
    if not (isinstance(value, torch.Tensor) and value.numel() == BIG_NUMEL):
        ctx.anomalies.append(f"{launcher.name} return_big: got {type(value).__name__}")
    del results, value
    return t_available - _read_stamp(path)


def m_resources(launcher: Launcher, ctx: Ctx) -> dict[str, float]:
    ru_c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru_s0 = resource.getrusage(resource.RUSAGE_SELF)
    with redirected_output(ctx.noise_fd), TreeSampler(0.02) as sampler:
        launcher.run("noop", {}, 4)
    ru_c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru_s1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_children = (ru_c1.ru_utime - ru_c0.ru_utime) + (ru_c1.ru_stime - ru_c0.ru_stime)
    cpu_self = (ru_s1.ru_utime - ru_s0.ru_utime) + (ru_s1.ru_stime - ru_s0.ru_stime)
    return {
        "pss_mib": sampler.peak_children_kib / 1024,
        "pss_total_mib": sampler.peak_total_kib / 1024,
        "procs": float(sampler.max_procs),
        "cpu_children_s": cpu_children,
        "cpu_self_s": cpu_self,
    }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

# metric key -> (label, unit, format)
METRICS: dict[str, tuple[str, str]] = {
    "cold_1": ("cold no-op N=1", "s"),
    "cold_2": ("cold no-op N=2", "s"),
    "cold_4": ("cold no-op N=4", "s"),
    "sigkill": ("SIGKILL -> exception (N=2)", "s"),
    "raise": ("raise w/ blocked peer -> exc (N=2)", "s"),
    "return_big": ("100 MB return -> value (N=2)", "s"),
    "pss_mib": ("N=4 peak PSS, spawned tree", "MiB"),
    "pss_total_mib": ("  (info) incl. launcher process", "MiB"),
    "procs": ("  (info) max processes in tree", ""),
    "cpu_children_s": ("N=4 CPU s, children", "s"),
    "cpu_self_s": ("  (info) CPU s, launcher process", "s"),
}

# (metric, kind, threshold): kind "ratio" compares the torchrunx/elastic median ratio,
# "abs" the torchrunx median itself.
TARGETS: list[tuple[str, str, float]] = [
    ("cold_2", "ratio", 0.9),
    ("cold_4", "ratio", 0.5),
    ("per_extra_worker", "abs", 0.050),
    ("sigkill", "abs", 0.3),
    ("raise", "abs", 0.5),
    ("return_big", "abs", 0.3),
    ("pss_mib", "ratio", 0.7),
    ("cpu_children_s", "ratio", 0.5),
]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt(s: dict[str, float] | None, unit: str) -> str:
    if s is None:
        return "-"
    if unit == "MiB":
        return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"
    if unit == "":
        return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def build_report(samples: dict[str, dict[str, list[float]]], names: list[str]) -> dict[str, Any]:
    summary: dict[str, dict[str, Any]] = {}
    for launcher in names:
        summary[launcher] = {m: _summary(v) for m, v in samples[launcher].items() if v}
        s = summary[launcher]
        if "cold_1" in s and "cold_4" in s:
            summary[launcher]["per_extra_worker"] = {
                "median": (s["cold_4"]["median"] - s["cold_1"]["median"]) / 3,
                "min": float("nan"),
                "max": float("nan"),
                "n": 0,
            }
    targets = []
    trx = summary.get("torchrunx", {})
    for metric, kind, threshold in TARGETS:
        if metric not in trx:
            continue
        row: dict[str, Any] = {"metric": metric, "kind": kind, "threshold": threshold}
        if kind == "abs":
            row["value"] = trx[metric]["median"]
            row["pass"] = row["value"] <= threshold
        else:
            for other in names[1:]:
                if metric in summary[other] and summary[other][metric]["median"] > 0:
                    ratio = trx[metric]["median"] / summary[other][metric]["median"]
                    row[f"ratio_vs_{other}"] = ratio
                    row[f"pass_vs_{other}"] = ratio <= threshold
            if len(names) > 1:
                row["value"] = row.get(f"ratio_vs_{names[1]}")
                row["pass"] = row.get(f"pass_vs_{names[1]}")
        targets.append(row)
    return {"summary": summary, "targets": targets}


def print_table(report: dict[str, Any], names: list[str], out: Any) -> None:
    summary = report["summary"]
    targets = {t["metric"]: t for t in report["targets"]}
    header = ["metric", *(f"{n} median (min-max)" for n in names)]
    header += [f"ratio vs {n}" for n in names[1:]]
    header += ["target", "result"]
    rows = [header]
    for metric, (label, unit) in [*METRICS.items(), ("per_extra_worker", ("per extra worker (t4-t1)/3", "s"))]:
        if not any(metric in summary[n] for n in names):
            continue
        row = [label + (f" [{unit}]" if unit else "")]
        for n in names:
            s = summary[n].get(metric)
            if metric == "per_extra_worker" and s is not None:
                row.append(f"{s['median']:.3f}")
            else:
                row.append(_fmt(s, unit))
        trx_s = summary["torchrunx"].get(metric)
        for n in names[1:]:
            other = summary[n].get(metric)
            if trx_s is not None and other is not None and other["median"] > 0:
                row.append(f"{trx_s['median'] / other['median']:.2f}x")
            else:
                row.append("-")
        t = targets.get(metric)
        if t is None:
            row += ["", ""]
        else:
            if t["kind"] == "ratio":
                row.append(f"<= {t['threshold']}x elastic")
                verdicts = [
                    ("PASS" if t[f"pass_vs_{n}"] else "FAIL") + ("" if i == 0 else f" (vs {n})")
                    for i, n in enumerate(names[1:])
                    if f"pass_vs_{n}" in t
                ]
                row.append(", ".join(verdicts))
            else:
                row.append(f"<= {t['threshold']:.3f} s")
                row.append("PASS" if t["pass"] else "FAIL")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    sep = "  "
    for i, r in enumerate(rows):
        print(sep.join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip(), file=out)
        if i == 0:
            print(sep.join("-" * w for w in widths), file=out)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="repetitions per metric and launcher (default 5)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 rep, no tuned-elastic launcher")
    p.add_argument("--json", metavar="PATH", help="write raw samples, summaries and targets to PATH")
    p.add_argument(
        "--monitor-interval",
        type=float,
        default=None,
        help="elastic_launch monitor_interval for the 'elastic' column (default: LaunchConfig's default)",
    )
    p.add_argument(
        "--tuned-monitor-interval",
        type=float,
        default=0.01,
        help="monitor_interval of the extra 'elastic_tuned' column (default 0.01; 0 to drop the column)",
    )
    p.add_argument(
        "--only",
        default="cold,sigkill,raise,return_big,resources",
        help="comma-separated subset of: cold,sigkill,raise,return_big,resources",
    )
    p.add_argument("--launchers", default="torchrunx,elastic,elastic_tuned", help="subset, comma-separated")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first launch of each launcher")
    p.add_argument("--output-log", metavar="PATH", help="where launch output goes (default: a temp file)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
        args.tuned_monitor_interval = 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from torch.distributed.launcher.api import LaunchConfig

    default_mi = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).monitor_interval
    elastic_mi = default_mi if args.monitor_interval is None else args.monitor_interval

    # elastic's agent logs every step at INFO/WARNING; keep the report readable.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.launcher").setLevel(logging.CRITICAL)

    wanted = set(args.launchers.split(","))
    launchers: list[Launcher] = [TorchrunxLauncher()]
    if "elastic" in wanted:
        launchers.append(ElasticLauncher(elastic_mi, "elastic"))
    if "elastic_tuned" in wanted and args.tuned_monitor_interval > 0:
        launchers.append(ElasticLauncher(args.tuned_monitor_interval, "elastic_tuned"))
    names = [launcher.name for launcher in launchers]
    only = set(args.only.split(","))

    tmp = tempfile.mkdtemp(prefix="bench_launch-")
    log_path = args.output_log or os.path.join(tmp, "launch-output.log")
    noise_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    ctx = Ctx(tmp=tmp, noise_fd=noise_fd)
    out = sys.stdout

    print(
        f"bench_launch: reps={args.reps}, launchers={names}, elastic monitor_interval={elastic_mi} "
        f"(LaunchConfig default {default_mi})"
        + (f", elastic_tuned monitor_interval={args.tuned_monitor_interval}" if "elastic_tuned" in names else ""),
        file=out,
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
        f"launch output -> {log_path}",
        file=out,
        flush=True,
    )

    samples: dict[str, dict[str, list[float]]] = {n: {m: [] for m in METRICS} for n in names}
    started = time.perf_counter()

    if not args.no_warmup:
        for launcher in launchers:
            t = m_cold(launcher, ctx, 1)
            print(f"  warm-up {launcher.name}: {t:.3f} s (not counted)", file=out, flush=True)

    def record(launcher: Launcher, metric: str, value: float) -> None:
        samples[launcher.name][metric].append(value)

    plan: list[tuple[str, Callable[[Launcher], None]]] = []
    if "cold" in only:
        for n in (1, 2, 4):
            plan.append((f"cold_{n}", lambda lz, n=n: record(lz, f"cold_{n}", m_cold(lz, ctx, n))))
    if "sigkill" in only:
        plan.append(("sigkill", lambda lz: record(lz, "sigkill", m_sigkill(lz, ctx))))
    if "raise" in only:
        plan.append(("raise", lambda lz: record(lz, "raise", m_raise(lz, ctx))))
    if "return_big" in only:
        plan.append(("return_big", lambda lz: record(lz, "return_big", m_return_big(lz, ctx))))
    if "resources" in only:

        def resources(lz: Launcher) -> None:
            for k, v in m_resources(lz, ctx).items():
                record(lz, k, v)

        plan.append(("resources", resources))

    for rep in range(args.reps):
        # Alternate launchers within each metric, rotating who goes first every repetition.
        order = launchers[rep % len(launchers) :] + launchers[: rep % len(launchers)]
        line = []
        for metric, fn in plan:
            for launcher in order:
                fn(launcher)
            if metric.startswith("cold") or metric in ("sigkill", "raise", "return_big"):
                line.append(f"{metric}=" + "/".join(f"{samples[n][metric][-1]:.2f}" for n in names))
        print(f"  rep {rep + 1}/{args.reps}: " + " ".join(line), file=out, flush=True)

    elapsed = time.perf_counter() - started
    report = build_report(samples, names)
    print(file=out)
    print_table(report, names, out)
    print(file=out)
    extra = "; ".join(
        f"{n}: {report['summary'][n]['per_extra_worker']['median'] * 1000:.0f} ms"
        for n in names
        if "per_extra_worker" in report["summary"][n]
    )
    if extra:
        print(f"per extra worker (t(4)-t(1))/3: {extra}", file=out)
    for a in ctx.anomalies:
        print(f"ANOMALY: {a}", file=out)
    failed = [t["metric"] for t in report["targets"] if t.get("pass") is False]
    print(
        f"targets: {len(report['targets']) - len(failed)}/{len(report['targets'])} pass"
        + (f" (failing: {', '.join(failed)})" if failed else "")
        + f"; total runtime {elapsed:.1f} s",
        file=out,
    )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {
                        "reps": args.reps,
                        "launchers": names,
                        "elastic_monitor_interval": elastic_mi,
                        "elastic_tuned_monitor_interval": args.tuned_monitor_interval
                        if "elastic_tuned" in names
                        else None,
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "cpus": os.cpu_count(),
                        "warmup": not args.no_warmup,
                    },
                    "samples": samples,
                    **report,
                    "anomalies": ctx.anomalies,
                    "runtime_s": elapsed,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}", file=out)
    os.close(noise_fd)
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
