#!/usr/bin/env python
"""Device check: the GPU paths of torchrunx, proven on a machine that has CUDA GPUs.

Prints one line per check, ``PASS name: numbers``, ``FAIL name: why`` or ``SKIP name: why``,
and exits 1 if any check failed. Lines starting with ``#`` are information.

GPU checks (SKIP without CUDA, or with ``--cpu-only``):

- cold start with CUDA: wall time of the first launch of this process, a no-op, nccl;
- a probe run with ``workers_per_host="gpu"`` and ``backend="auto"``: one worker per GPU,
  each worker's current device is its local rank, the backend is nccl, an all_reduce of
  a CUDA tensor is correct, and the agent (the workers' parent) holds no CUDA context,
  checked twice (at worker start and after the all_reduce) in ``nvidia-smi``'s list of
  processes holding GPU memory;
- a worker SIGKILLed in an NCCL collective: ``WorkerFailedError`` within 1 s, and no
  process left holding GPU memory (polled for up to 10 s);
- two workers sharing one GPU (``workers_per_host=2``, ``CUDA_VISIBLE_DEVICES=0``): what
  NCCL does, reported as it happens (not a failure unless the run hangs);
- a warm session (``with Launcher(...) as launcher``), when this version has them: no CUDA
  context in the agent between two runs;
- a 1 GiB CUDA tensor returned by rank 0: time until it is a CUDA tensor in this process
  (last, since it gives this process a CUDA context).

CPU smoke (always, with GPUs hidden): 2 workers, gloo, all_reduce correct; a SIGKILLed
worker raises ``WorkerFailedError``, with its latency.

Run:  python benchmarks/gpu_check.py [--cpu-only] [--budget 240] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import torchrunx as trx

LAUNCH_TIMEOUT_S = 60  # process-group timeout and agent start, per launch
HANG_S = 30.0  # a worker making no progress this long stops its launch
KILL_BOUND_S = 1.0
CPU_KILL_BOUND_S = 5.0  # the CPU smoke runs on loaded CI machines: a bound against a hang, not a target
CLEANUP_POLL_S = 10.0
BIG_ELEMENTS = 1 << 28  # float32: 1 GiB

Line = tuple[str, str, str]  # (PASS / FAIL / SKIP, check name, text)


# -- run inside the workers (pickled by value with this script) ---------------------------


def _gpu_processes() -> dict[int, int] | None:
    """pid -> MiB of every process holding GPU memory, per nvidia-smi; None if it cannot tell."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    apps = {}
    for row in out.splitlines():
        pid, _, mib = (s.strip() for s in row.partition(","))
        if pid.isdigit():
            apps[int(pid)] = int(mib) if mib.isdigit() else -1
    return apps


def _maps_libcuda(pid: int) -> bool | None:
    """Whether the CUDA driver library is loaded in `pid` (no context without it)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libcuda.so" in f.read()
    except OSError:
        return None


def _stamp_and_die(stamp: str) -> None:
    Path(stamp).write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def _noop() -> None:
    return None


def _probe() -> dict[str, Any]:
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    info: dict[str, Any] = {
        "local_rank": local_rank,
        "device": torch.cuda.current_device(),
        "backend": str(dist.get_backend()),
        "world": dist.get_world_size(),
        "pid": os.getpid(),
        "agent": os.getppid(),
        "bad_fork": getattr(torch.cuda, "_is_in_bad_fork", lambda: None)(),
    }
    torch.zeros(1, device="cuda")  # this worker's own context, so the process list must show it
    torch.cuda.synchronize()
    if local_rank == 0:
        info["apps_start"] = _gpu_processes()
    t = torch.full((1 << 20,), float(dist.get_rank() + 1), device="cuda")
    dist.all_reduce(t)
    info["all_reduce_ok"] = bool((t == info["world"] * (info["world"] + 1) / 2).all())
    torch.cuda.synchronize()
    if local_rank == 0:
        info["apps_end"] = _gpu_processes()
        info["libcuda_in_agent"] = _maps_libcuda(info["agent"])
    return info


def _die_in_nccl_collective(stamp: str) -> None:
    import torch.distributed as dist

    t = torch.ones(1 << 24, device="cuda")
    dist.all_reduce(t)  # the communicator exists from here on: what follows is a collective, not its set-up
    torch.cuda.synchronize()
    victim = dist.get_world_size() - 1
    if dist.get_rank() != victim:
        dist.all_reduce(t)
        torch.cuda.synchronize()  # waits on the GPU for the victim, which never comes
        return
    if victim > 0:
        time.sleep(1.0)  # the others are inside the collective by now
    else:
        dist.all_reduce(t)  # alone in the group: die with this collective in flight
    _stamp_and_die(stamp)


def _shared_gpu_all_reduce() -> tuple[int, float]:
    import torch.distributed as dist

    t = torch.ones(1, device="cuda")
    dist.all_reduce(t)
    return torch.cuda.current_device(), t.item()


def _session_probe() -> dict[str, Any]:
    import torch.distributed as dist

    t = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    agent = os.getppid()
    return {"agent": agent, "apps": _gpu_processes(), "pid": os.getpid(), "libcuda_in_agent": _maps_libcuda(agent)}


def _big_cuda_tensor() -> tuple[float, torch.Tensor] | None:
    if os.environ["RANK"] != "0":
        return None
    t = torch.ones(BIG_ELEMENTS, device="cuda")
    torch.cuda.synchronize()
    return time.time(), t


def _cpu_all_reduce() -> tuple[str, float]:
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return str(dist.get_backend()), t.item()


def _cpu_die(stamp: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(0.3)  # rank 0 is in the barrier by now
        _stamp_and_die(stamp)
    dist.barrier()


# -- in this process ----------------------------------------------------------------------


@dataclass
class Context:
    """What the steps share: the current step's log folder, and what earlier steps learned."""

    logs: Path
    gpus: int
    probe_sees_processes: bool | None = None  # does nvidia-smi list the workers of this machine?


def _launcher(logs: Path, **fields: Any) -> trx.Launcher:
    fields = {"hostnames": ["localhost"], "timeout": LAUNCH_TIMEOUT_S, "hang_timeout": HANG_S, **fields}
    return trx.Launcher(logs=logs, log_console=None, **fields)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set launcher environment variables (forwarded to agents) for the duration."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _why(e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"[:300]


def _time_death(launcher: trx.Launcher, func: Callable[..., Any], stamp: Path) -> tuple[BaseException | None, float]:
    """Run a launch in which a worker stamps the time and kills itself; (exception, latency)."""
    stamp.unlink(missing_ok=True)
    try:
        launcher.run(func, {"stamp": str(stamp)})
    except BaseException as e:
        caught = time.time()
        if isinstance(e, KeyboardInterrupt):
            raise
        latency = caught - float(stamp.read_text()) if stamp.exists() else float("nan")
        return e, latency
    return None, float("nan")


def _others_holding_gpu(baseline: dict[int, int]) -> dict[int, int] | None:
    apps = _gpu_processes()
    if apps is None:
        return None
    return {pid: mib for pid, mib in apps.items() if pid != os.getpid() and pid not in baseline}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80].strip()
    except OSError:
        return "?"


def step_cold(ctx: Context) -> list[Line]:
    start = time.perf_counter()
    results = _launcher(ctx.logs, workers_per_host="gpu", backend="auto").run(_noop)
    seconds = time.perf_counter() - start
    text = f"{seconds:.2f} s (no-op, {len(results)} worker(s), backend auto, first launch of this process)"
    return [("PASS", "cold start with CUDA", text)]


def step_probe(ctx: Context) -> list[Line]:
    results = _launcher(ctx.logs, workers_per_host="gpu", backend="auto").run(_probe)
    infos = [results[r] for r in results]
    lines: list[Line] = []
    ok = len(infos) == ctx.gpus
    lines.append((_status(ok), "workers_per_host=gpu", f"{len(infos)} worker(s) for {ctx.gpus} GPU(s)"))
    devices = [(i["local_rank"], i["device"]) for i in infos]
    ok = all(lr == dev for lr, dev in devices)
    lines.append((_status(ok), "current device = local rank", "(local rank, current device): " + str(devices)))
    backends = sorted({i["backend"] for i in infos})
    lines.append((_status(backends == ["nccl"]), "backend auto = nccl", f"dist.get_backend() = {backends}"))
    ok = all(i["all_reduce_ok"] for i in infos)
    text = f"{'correct' if ok else 'WRONG'} on {len(infos)} rank(s), 2**20 float32 on cuda"
    lines.append((_status(ok), "nccl all_reduce", text))
    lines.append(_agent_context_line(ctx, next(i for i in infos if i["local_rank"] == 0), infos))
    return lines


def _agent_context_line(ctx: Context, rank0: dict[str, Any], infos: list[dict[str, Any]]) -> Line:
    name, agent = "agent has no CUDA context", rank0["agent"]
    bad_fork = any(i["bad_fork"] for i in infos)
    extra = f"libcuda loaded in agent: {rank0['libcuda_in_agent']}; workers in a bad fork: {bad_fork}"
    start, end = rank0["apps_start"] or {}, rank0["apps_end"] or {}
    ctx.probe_sees_processes = rank0["pid"] in start
    if not ctx.probe_sees_processes:  # no nvidia-smi, or another pid namespace: judged by libcuda alone
        ok = rank0["libcuda_in_agent"] is False and not bad_fork
        return (_status(ok), name, f"nvidia-smi does not list this machine's workers; {extra}")
    ok = agent not in start and agent not in end and not bad_fork
    text = (
        f"agent pid {agent} {'absent from' if ok else 'IN'} nvidia-smi at worker start and after all_reduce "
        f"(worker itself listed with {start[rank0['pid']]} MiB); {extra}"
    )
    return (_status(ok), name, text)


def step_kill(ctx: Context) -> list[Line]:
    baseline = _gpu_processes() or {}
    e, latency = _time_death(
        _launcher(ctx.logs, workers_per_host="gpu", backend="auto"), _die_in_nccl_collective, ctx.logs / "stamp"
    )
    world = "alone, collective in flight" if ctx.gpus == 1 else f"rank {ctx.gpus - 1} of {ctx.gpus}, peers blocked"
    if isinstance(e, trx.WorkerFailedError):
        ok = latency <= KILL_BOUND_S
        first = (_status(ok), "sigkill in nccl collective", f"WorkerFailedError after {latency:.3f} s ({world})")
    else:
        first = ("FAIL", "sigkill in nccl collective", f"expected WorkerFailedError, got {_why(e) if e else 'none'}")
    name = "no GPU memory left after kill"
    if ctx.probe_sees_processes is False:
        return [first, ("SKIP", name, "nvidia-smi does not list this machine's processes")]
    start = time.monotonic()
    while (left := _others_holding_gpu(baseline)) and time.monotonic() - start < CLEANUP_POLL_S:
        time.sleep(0.1)
    if left is None:
        return [first, ("SKIP", name, "nvidia-smi unavailable")]
    if left:
        held = ", ".join(f"pid {p} ({_cmdline(p)}) {m} MiB" for p, m in left.items())
        return [first, ("FAIL", name, f"after {CLEANUP_POLL_S:.0f} s still held: {held}")]
    return [first, ("PASS", name, f"none {time.monotonic() - start:.2f} s after the exception")]


def step_shared_gpu(ctx: Context) -> list[Line]:
    name = "two workers on one GPU"
    start = time.perf_counter()
    with _env(CUDA_VISIBLE_DEVICES="0"):
        launcher = _launcher(ctx.logs, workers_per_host=2, backend="auto", hang_timeout=20.0)
        try:
            results = launcher.run(_shared_gpu_all_reduce)
        except (trx.WorkerHungError, trx.AgentFailedError) as e:  # hung or broken: not a choice NCCL made
            return [("FAIL", name, _why(e))]
        except Exception as e:
            seconds = time.perf_counter() - start
            return [("PASS", name, f"refused after {seconds:.1f} s (NCCL allows one rank per GPU): {_why(e)}")]
    seconds = time.perf_counter() - start
    values = [results[r] for r in results]
    ok = all(v == 2.0 for _, v in values)
    return [(_status(ok), name, f"ran in {seconds:.1f} s, (device, all_reduce of 1s): {values}")]


def step_session(ctx: Context) -> list[Line]:
    name = "warm session"
    if not hasattr(trx.Launcher, "__enter__"):
        return [("SKIP", name, "not available in this version")]
    with _launcher(ctx.logs, workers_per_host="gpu", backend="auto") as session:
        first = session.run(_session_probe)[0]
        between = _gpu_processes()
        second = session.run(_session_probe)[0]
    if first["agent"] != second["agent"]:
        return [("FAIL", name, f"not warm: agent pid {first['agent']} then {second['agent']}")]
    agent = first["agent"]
    if between is None or first["apps"] is None or first["pid"] not in first["apps"]:
        libcuda = second["libcuda_in_agent"]
        return [
            (_status(libcuda is False), name, f"nvidia-smi lists no worker here; libcuda loaded in agent: {libcuda}")
        ]
    seen = {"run 1": first["apps"], "between runs": between, "run 2": second["apps"]}
    held = [when for when, apps in seen.items() if agent in apps]
    ok = not held
    return [(_status(ok), name, f"agent pid {agent} kept; holds GPU memory: {', '.join(held) or 'never'}")]


def step_big_return(ctx: Context) -> list[Line]:
    name = "1 GiB CUDA return"
    start = time.perf_counter()
    results = _launcher(ctx.logs, workers_per_host="gpu", backend="auto").run(_big_cuda_tensor)
    in_hand = time.time()
    total = time.perf_counter() - start
    stamp, tensor = results[0]
    ok = tensor.is_cuda and tensor.numel() == BIG_ELEMENTS and bool((tensor == 1).all())
    seconds = in_hand - stamp
    text = f"{seconds:.2f} s from the worker's return ({1 / seconds:.2f} GiB/s), launch {total:.2f} s, {tensor.device}"
    del tensor, results
    torch.cuda.empty_cache()
    return [(_status(ok), name, text if ok else "wrong tensor: " + text)]


def step_cpu_all_reduce(ctx: Context) -> list[Line]:
    start = time.perf_counter()
    results = _launcher(ctx.logs, workers_per_host=2, backend="gloo").run(_cpu_all_reduce)
    seconds = time.perf_counter() - start
    values = [results[r] for r in results]
    ok = values == [("gloo", 3.0), ("gloo", 3.0)]
    return [(_status(ok), "cpu all_reduce", f"{values} in {seconds:.2f} s (2 workers, cold)")]


def step_cpu_kill(ctx: Context) -> list[Line]:
    launcher = _launcher(ctx.logs, workers_per_host=2, backend="gloo")
    e, latency = _time_death(launcher, _cpu_die, ctx.logs / "stamp")
    if not isinstance(e, trx.WorkerFailedError):
        return [("FAIL", "cpu sigkill", f"expected WorkerFailedError, got {_why(e) if e else 'none'}")]
    ok = latency <= CPU_KILL_BOUND_S
    return [(_status(ok), "cpu sigkill", f"WorkerFailedError after {latency:.3f} s ({e.how})")]


def _status(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


Step = tuple[tuple[str, ...], Callable[[Context], list[Line]]]

GPU_STEPS: list[Step] = [
    (("cold start with CUDA",), step_cold),
    (
        (
            "workers_per_host=gpu",
            "current device = local rank",
            "backend auto = nccl",
            "nccl all_reduce",
            "agent has no CUDA context",
        ),
        step_probe,
    ),
    (("sigkill in nccl collective", "no GPU memory left after kill"), step_kill),
    (("two workers on one GPU",), step_shared_gpu),
    (("warm session",), step_session),
    (("1 GiB CUDA return",), step_big_return),  # last: it gives this process a CUDA context
]
CPU_STEPS: list[Step] = [(("cpu all_reduce",), step_cpu_all_reduce), (("cpu sigkill",), step_cpu_kill)]


def _run_step(names: tuple[str, ...], step: Callable[[Context], list[Line]], ctx: Context, logs: Path) -> bool:
    """Run one step, its log files in `logs`, and print its lines; False if any of them failed."""
    ctx.logs = logs
    logs.mkdir(parents=True)
    try:
        lines = step(ctx)
    except Exception as e:
        lines = [("FAIL", name, _why(e)) for name in names]
    for status, name, text in lines:
        print(f"{status} {name}: {text}", flush=True)
    failed = any(status == "FAIL" for status, _, _ in lines)
    if failed:
        _print_log_tails(ctx.logs)
    return not failed


def _print_log_tails(folder: Path, lines: int = 15) -> None:
    for log in sorted(folder.glob("*.log"))[:4]:
        print(f"#   {log.name}:")
        for text in log.read_text(errors="replace").splitlines()[-lines:]:
            print(f"#     {text}")
    sys.stdout.flush()


def _watchdog(budget: float) -> None:
    """Never hang: print a FAIL line and exit 1 once `budget` seconds have passed. Should this
    process be wedged in C code holding the GIL, faulthandler dumps the stacks and exits a bit later."""

    def expire() -> None:
        print(f"FAIL watchdog: the checks took longer than {budget:.0f} s", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1)

    timer = threading.Timer(budget, expire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(budget + 10, exit=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU checks, hide GPUs from the smoke run")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds before the watchdog stops everything")
    parser.add_argument("--logs", type=Path, help="keep the runs' log files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    _watchdog(args.budget)

    # NVML answers without creating a CUDA context in this process.
    gpus = 0 if args.cpu_only else torch.cuda.device_count()
    nccl = str(torch.cuda.nccl.version()) if gpus else "-"
    python = sys.version.split()[0]
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, GPUs {gpus}, python {python}")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    passed = True
    ctx = Context(logs, gpus)
    for i, (names, step) in enumerate(GPU_STEPS):
        if gpus == 0:
            for name in names:
                print(f"SKIP {name}: no GPU", flush=True)
            continue
        passed &= _run_step(names, step, ctx, logs / f"gpu{i}")
    with _env(CUDA_VISIBLE_DEVICES=""):  # the smoke run is the same with or without GPUs
        for i, (names, step) in enumerate(CPU_STEPS):
            passed &= _run_step(names, step, ctx, logs / f"cpu{i}")
    if passed and args.logs is None:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"# logs: {logs}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
