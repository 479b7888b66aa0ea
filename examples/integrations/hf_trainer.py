"""Hugging Face Transformers' `Trainer` on 2 CPU workers, a tiny GPT-2 built from a config.

    python examples/integrations/hf_trainer.py
    python examples/integrations/hf_trainer.py --steps 20 --workers 4

`train` runs in every worker, as a torchrun script's body would. The `Trainer` reads RANK,
WORLD_SIZE, LOCAL_RANK... from the environment and finds the process group that torchrunx
initialised (gloo on CPU), so it trains data-parallel with no launcher-specific code. The model
has random weights and the data is random tokens: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import Dataset

import torchrunx as trx


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    """Fixed random token sequences; the labels are the inputs (causal language modelling)."""

    def __init__(self, n: int, length: int, vocab_size: int) -> None:
        self.tokens = torch.randint(vocab_size, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def train(steps: int, output_dir: str) -> dict[str, float]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=steps,
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64, 16, config.vocab_size))
    result = trainer.train()
    return {"world_size": trainer.args.world_size, "steps": result.global_step, "loss": result.training_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        results = trx.launch(
            train,
            {"steps": args.steps, "output_dir": output_dir},
            hostnames=["localhost"],
            workers_per_host=args.workers,
            backend="gloo",
        )
    r = results[0]
    print(f"hf_trainer: {r['world_size']} workers, {r['steps']} steps, loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
