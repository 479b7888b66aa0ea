"""An unchanged torchrun-style training script: what `torchrun --nproc-per-node 2 torchrun_script.py`
would run. It parses its own flags, initialises the process group itself from the environment,
loads data with spawned DataLoader workers over a Dataset class defined here, and exits with the
code given by --exit-code.
"""

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


class Squares(Dataset):
    """i -> i * i; defined in the script, so spawned loader workers must re-import the script."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(float(i * i))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--raise-on-rank", type=int, default=None)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.raise_on_rank == rank:
        raise ValueError(f"rank {rank} was asked to raise")

    loader = DataLoader(
        Squares(args.items),
        batch_size=2,
        num_workers=args.loader_workers,
        multiprocessing_context="spawn" if args.loader_workers else None,
    )
    local = torch.stack([batch.sum() for batch in loader]).sum()  # every rank reads the whole set
    total = local.clone()
    dist.all_reduce(total)

    hosts = [""] * world_size
    dist.all_gather_object(hosts, socket.gethostname())
    print(
        f"rank {rank}/{world_size} local_rank {os.environ['LOCAL_RANK']} argv {sys.argv[1:]} "
        f"loaded {local.item():g} all_reduce {total.item():g} hosts {','.join(hosts)}",
        flush=True,
    )
    dist.barrier()  # every rank has printed before any of them exits
    dist.destroy_process_group()
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
