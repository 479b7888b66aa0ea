"""Preemptible training: save a checkpoint when warned, and resume from it when started again.

    python examples/preemptible.py --checkpoint ckpt.pt --workers-per-host 2
    kill -USR1 <the launcher's pid>      # from another terminal: rank 0 saves, the run ends (exit 3)
    python examples/preemptible.py --checkpoint ckpt.pt --workers-per-host 2     # resumes, finishes

In a SLURM batch script, warned two minutes before the time limit, and requeued:

    #!/bin/bash
    #SBATCH --nodes=2 --requeue --signal=B:USR1@120 --open-mode=append
    exec python examples/preemptible.py --checkpoint /shared/run1/ckpt.pt

``--signal=B:USR1@120`` sends SIGUSR1 to the batch shell only, and ``exec`` makes this launcher
that shell. The launcher sends the signal on to every worker, on every host. Each worker's
handler only notes it; the training loop sees the note at the end of a step, the ranks agree
to stop at the same step (one small all_reduce), rank 0 saves the checkpoint, and every rank
returns. The launcher then raises `torchrunx.RunInterrupted` (whatever the workers did: the
run was cut short), and this script puts its job back in the queue (``scontrol requeue``).
When the job runs again, the workers load the checkpoint and go on from its step.

SIGTERM (``scancel``, or a preemption without a warning) is handled the same way. Workers get
``Launcher.signal_grace`` seconds (here ``--grace``) to end before they are stopped; SLURM kills
the job itself ``KillWait`` seconds (typically 30) after its SIGTERM. A checkpoint every
``--save-every`` steps covers a job that ends with no warning at all.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchrunx as trx

EXIT_INTERRUPTED = 3
"""This script's exit code when the run was interrupted: run it again to resume."""


def save(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, path: Path) -> None:
    """Write the checkpoint next to its place, then move it there: never a half-written file."""
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, partial)
    os.replace(partial, path)


def train(checkpoint: str, steps: int, save_every: int, step_time: float) -> dict[str, Any]:
    """DDP regression from the checkpoint (if any) to `steps`; stops early when signalled."""
    signalled: list[int] = []  # a handler only takes note: the loop acts at a step's end
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: signalled.append(signum))

    rank, world_size = dist.get_rank(), dist.get_world_size()
    path = Path(checkpoint)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    x, y = x[rank::world_size], y[rank::world_size]
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first = 0
    if path.exists():
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first = state["step"]
        if rank == 0:
            print(f"resumed from step {first}")
    ddp = DistributedDataParallel(model)

    step, loss = first, torch.tensor(float("nan"))
    while step < steps:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        time.sleep(step_time)  # stands for the rest of a real step's work
        step += 1
        # The signal reaches the ranks at slightly different moments: agree on where to stop,
        # or one rank would wait forever in the next step's all_reduce for a rank that left.
        stop = torch.tensor([float(bool(signalled))])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if rank == 0 and (stop.item() or step % save_every == 0 or step == steps):
            save(model, optimizer, step, path)
        if rank == 0 and step % 10 == 0:
            print(f"step {step}  loss {loss.item():.4f}")
        if stop.item():
            break
    return {"step": step, "first": first, "loss": loss.item(), "workers": world_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="preemptible.pt", help="where to save and resume from")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=50, help="steps between periodic checkpoints")
    parser.add_argument("--step-time", type=float, default=0.05, help="seconds of simulated work per step")
    parser.add_argument("--workers-per-host", type=int, default=None, help="default: as the allocation says, or 1")
    parser.add_argument("--grace", type=float, default=30.0, help="Launcher.signal_grace, in seconds")
    args = parser.parse_args()

    launcher = trx.Launcher(workers_per_host=args.workers_per_host or "auto", backend="gloo", signal_grace=args.grace)
    kwargs = {"checkpoint": args.checkpoint, "steps": args.steps, "save_every": args.save_every}
    try:
        results = launcher.run(train, {**kwargs, "step_time": args.step_time})
    except trx.RunInterrupted as e:
        saved = f"step {e.results[0]['step']}" if e.results else "the last periodic one"
        print(f"interrupted by {e.signal}: checkpoint at {saved} in {args.checkpoint}", flush=True)
        job = os.environ.get("SLURM_JOB_ID")
        if job:  # back in the queue: when it runs again, it resumes from the checkpoint
            subprocess.run(["scontrol", "requeue", job], check=False)
        sys.exit(EXIT_INTERRUPTED)
    last = results[0]
    started = f"started at {last['first']}"
    print(f"finished: step {last['step']} ({started}) on {last['workers']} workers, loss {last['loss']:.4f}")


if __name__ == "__main__":
    main()
