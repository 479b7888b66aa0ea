"""DeepSpeed on 2 CPU workers: `deepspeed.initialize` with ZeRO stage 1, gloo underneath.

    python examples/integrations/deepspeed_train.py
    python examples/integrations/deepspeed_train.py --steps 50 --workers 4

`train` is the body of a script one would start with the `deepspeed` launcher or torchrun.
`deepspeed.initialize` reads RANK, WORLD_SIZE, MASTER_ADDR... and initialises the process group
itself (gloo: DeepSpeed's CPU accelerator falls back to it without Intel's oneCCL), so torchrunx
starts no group here (``backend=None``). The optimizer is torch's own AdamW: DeepSpeed's fused
optimizers need CUDA or a compiler at run time. The optimizer state is partitioned across the
workers (ZeRO stage 1); rank 0 returns the first and last loss, averaged over the workers.

The first run on a machine compiles DeepSpeed's shared-memory communication op for CPU (gcc
and ninja, about a minute on 2 cores) into ~/.cache/torch_extensions; later runs load it.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import torchrunx as trx


def train(steps: int) -> dict[str, float]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would otherwise guess, without the warning
    import deepspeed
    import torch.distributed as dist

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**6,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), config=config
    )
    g = torch.Generator().manual_seed(dist.get_rank())  # each worker its own data
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        loss = nn.functional.mse_loss(engine(x), x @ w)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return {"world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage(), "first": losses[0],
            "last": losses[-1]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results = trx.launch(
        train, {"steps": args.steps}, hostnames=["localhost"], workers_per_host=args.workers, backend=None
    )
    r = results[0]
    print(
        f"deepspeed: {r['world_size']} processes, ZeRO stage {r['zero_stage']}, "
        f"loss {r['first']:.3f} -> {r['last']:.3f}"
    )


if __name__ == "__main__":
    main()
