"""A hyper-parameter sweep that outlives its failing configurations.

    python examples/sweep.py
    python examples/sweep.py --simulate-preemption   # also shows a retry after a killed worker

Each configuration is one `launch`. Two kinds of failure are handled differently:

- the training function itself raises (here: the loss diverges for a too-large learning rate):
  the same exception type arrives in this program, so the sweep records it and moves on;
- a worker dies without raising (killed by the OOM killer, a preempted node...):
  `WorkerFailedError` arrives, and since that may pass, the configuration is tried again.
"""

from __future__ import annotations

import argparse
import math
import os
import signal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchrunx as trx

LEARNING_RATES = (0.01, 0.1, 50.0)
MAX_ATTEMPTS = 2


def train(lr: float, epochs: int, kill_rank_1: bool) -> float:
    """DDP regression on every worker; returns the final loss (the same on every rank)."""
    if kill_rank_1 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss diverged at epoch {epoch} with lr={lr}")
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument(
        "--simulate-preemption", action="store_true", help="kill rank 1 in the first attempt of the first configuration"
    )
    args = parser.parse_args()

    launcher = trx.Launcher(hostnames=["localhost"], workers_per_host=args.workers, backend="gloo")
    losses: dict[float, float] = {}
    for i, lr in enumerate(LEARNING_RATES):
        for attempt in range(1, MAX_ATTEMPTS + 1):
            kill = args.simulate_preemption and i == 0 and attempt == 1
            try:
                results = launcher.run(train, {"lr": lr, "epochs": args.epochs, "kill_rank_1": kill})
            except trx.WorkerFailedError as e:
                print(f"lr={lr}: attempt {attempt} lost a worker ({e.how} on {e.hostname}), retrying")
                continue
            except FloatingPointError as e:
                print(f"lr={lr}: failed, skipped: {e}")
                break
            losses[lr] = results[0]
            print(f"lr={lr}: loss {losses[lr]:.4f}")
            break
        else:
            print(f"lr={lr}: gave up after {MAX_ATTEMPTS} attempts")

    if not losses:
        raise SystemExit("every configuration failed")
    best = min(losses, key=losses.__getitem__)
    failed = len(LEARNING_RATES) - len(losses)
    print(f"best: lr={best} (loss {losses[best]:.4f}); {failed} of {len(LEARNING_RATES)} failed")


if __name__ == "__main__":
    main()
