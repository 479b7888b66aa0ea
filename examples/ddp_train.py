"""Quick start: train a small model with DistributedDataParallel on 2 CPU workers of this machine.

    python examples/ddp_train.py            # or: ./dev example
    python examples/ddp_train.py --epochs 50 --workers 4

`train` runs in every worker. torchrunx has already initialised the process group (gloo on
CPU), so the function goes straight to DDP. Rank 0 saves a checkpoint and returns its path;
the launcher gets it back as ``results[0]`` and loads the model from it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchrunx as trx


def make_data(n: int = 4096, features: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic regression problem: y = x @ w + noise (the same on every worker)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g)
    return x, x @ w + 0.1 * torch.randn(n, 1, generator=g)


def train(epochs: int, lr: float, checkpoint_dir: str) -> str | None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    x, y = make_data()
    shard = slice(rank, None, world_size)  # each worker trains on its own part of the data
    x, y = x[shard], y[shard]

    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        for batch in torch.split(torch.randperm(len(x)), 128):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()  # DDP averages the gradients of all workers here
            optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (epoch % 5 == 0 or epoch == 1):
            print(f"epoch {epoch:3d}  loss {mean_loss.item() / world_size:.4f}")

    if rank != 0:
        return None
    path = Path(checkpoint_dir) / "ddp_train.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.module.state_dict(), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="workers on this machine (default 2)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--checkpoint-dir", default=os.path.join("outputs", "checkpoints"))
    args = parser.parse_args()

    launcher = trx.Launcher(hostnames=["localhost"], workers_per_host=args.workers, backend="gloo")
    results = launcher.run(train, {"epochs": args.epochs, "lr": args.lr, "checkpoint_dir": args.checkpoint_dir})

    checkpoint = results[0]
    state = torch.load(checkpoint)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    model.load_state_dict(state)
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    print(f"checkpoint from rank 0: {checkpoint} (loss on all data {final:.4f})")
    if final > 1.0:
        raise SystemExit(f"training did not converge: loss {final:.4f}")


if __name__ == "__main__":
    main()
