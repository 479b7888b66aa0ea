"""Two distributed stages in one program: train on N workers, then evaluate on 1.

    python examples/two_stage.py                  # train on 2 CPU workers, evaluate on 1
    python examples/two_stage.py --workers 4 --epochs 10

With torchrun this would be two scripts and two commands. Here each stage is a function and
one `launch` call; what a stage returns (a checkpoint path) is the next stage's argument.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchrunx as trx


def make_data(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in the plane, labelled by whether they lie inside the unit circle."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, 2, generator=g) - 1
    return x, (x.norm(dim=1) < 0.8).long()


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))


def train(epochs: int, checkpoint_dir: str) -> str | None:
    """Stage 1, on every worker: DDP training on this rank's shard; rank 0 saves the weights."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x, y = make_data()
    x, y = x[rank::world_size], y[rank::world_size]
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(epochs):
        for batch in torch.split(torch.randperm(len(x)), 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    if rank != 0:
        return None
    path = os.path.join(checkpoint_dir, "two_stage.pt")
    torch.save(model.module.state_dict(), path)
    return path


def evaluate(checkpoint: str) -> float:
    """Stage 2, on one worker: accuracy of the checkpoint on held-out data."""
    model = make_model()
    model.load_state_dict(torch.load(checkpoint))
    x, y = make_data(seed=1)
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="training workers on this machine (default 2)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as checkpoint_dir:
        trained = trx.launch(
            train,
            {"epochs": args.epochs, "checkpoint_dir": checkpoint_dir},
            hostnames=["localhost"],
            workers_per_host=args.workers,
            backend="gloo",
        )
        checkpoint = trained[0]
        print(f"stage 1: {args.workers} workers trained {checkpoint}")

        # One worker and no process group: evaluation needs no collectives.
        evaluated = trx.launch(
            evaluate, {"checkpoint": checkpoint}, hostnames=["localhost"], workers_per_host=1, backend=None
        )
        accuracy = evaluated[0]
        print(f"stage 2: 1 worker evaluated it: accuracy {accuracy:.3f}")
    if accuracy < 0.8:
        raise SystemExit(f"the model did not learn: accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
