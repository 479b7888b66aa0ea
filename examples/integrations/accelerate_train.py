"""Hugging Face accelerate on 2 CPU workers: `Accelerator.prepare`, `backward` and `gather`.

    python examples/integrations/accelerate_train.py
    python examples/integrations/accelerate_train.py --steps 50 --workers 4

`train` is an ordinary accelerate training loop, the body of a script one would start with
`accelerate launch` or torchrun. `Accelerator(cpu=True)` reads the worker's RANK, WORLD_SIZE,
MASTER_ADDR... and initialises the gloo process group itself, so torchrunx starts no group of
its own here (``backend=None``). Each step's loss is gathered from every worker; rank 0 returns
the first and last mean loss.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchrunx as trx


def train(steps: int) -> dict[str, float]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # sharded across workers by prepare()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses: list[float] = []
    while len(losses) < steps:
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            losses.append(accelerator.gather(loss.detach()).mean().item())
            if len(losses) == steps:
                break
    return {"processes": accelerator.num_processes, "first": losses[0], "last": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results = trx.launch(
        train, {"steps": args.steps}, hostnames=["localhost"], workers_per_host=args.workers, backend=None
    )
    r = results[0]
    print(f"accelerate: {r['processes']} processes, loss {r['first']:.3f} -> {r['last']:.3f}")


if __name__ == "__main__":
    main()
