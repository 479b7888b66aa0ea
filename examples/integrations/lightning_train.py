"""PyTorch Lightning's `Trainer` with ``strategy="ddp"`` on 2 CPU workers.

    python examples/integrations/lightning_train.py
    python examples/integrations/lightning_train.py --epochs 5 --workers 4

`train` builds a `LightningModule` and a `Trainer(accelerator="cpu", devices=N,
strategy="ddp")`, as a script started by torchrun would. Lightning sees the worker's RANK,
LOCAL_RANK, WORLD_SIZE... (the variables torchrun sets), does not start processes of its own,
and initialises the gloo process group itself, so torchrunx starts no group here
(``backend=None``). ``devices`` must equal the workers per host, as under torchrun.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchrunx as trx


def train(epochs: int, devices: int, root_dir: str) -> dict[str, float]:
    import lightning as L

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss, sync_dist=True)  # averaged over the workers
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp",
        max_epochs=epochs,
        default_root_dir=root_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), DataLoader(TensorDataset(x, y), batch_size=32))  # sharded by Lightning
    return {
        "world_size": trainer.world_size,
        "environment": type(trainer.strategy.cluster_environment).__name__,
        "loss": trainer.callback_metrics["loss"].item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root_dir:
        results = trx.launch(
            train,
            {"epochs": args.epochs, "devices": args.workers, "root_dir": root_dir},
            hostnames=["localhost"],
            workers_per_host=args.workers,
            backend=None,
        )
    r = results[0]
    print(f"lightning: {r['world_size']} processes ({r['environment']}), loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
