"""One run over several machines reached with SSH: every worker of every host in one process group.

    python examples/multihost.py --ssh-config ~/.ssh/config node1 node2
    python examples/multihost.py --ssh-config cluster.conf --workers-per-host 4 --env-file env.sh gpu1 gpu2

The hosts are `Host` entries of the ssh config (or names it has no entry for: then plain
ssh defaults apply). Each host must have this same Python interpreter and this same working
directory (a shared filesystem, or the same environment installed at the same path).
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

import torchrunx as trx


def where_am_i() -> tuple[str, float]:
    """On every worker: this host's name, and the sum of all ranks' (rank + 1), computed together."""
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    print(f"rank {os.environ['RANK']} (local rank {os.environ['LOCAL_RANK']}) on {socket.gethostname()}")
    return socket.gethostname(), total.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="+", help="host aliases, as in the ssh config")
    parser.add_argument("--ssh-config", type=Path, default=None, help="OpenSSH config (default ~/.ssh/config)")
    parser.add_argument("--workers-per-host", type=int, default=2)
    parser.add_argument("--env-file", type=Path, default=None, help="a file bash sources on every host first")
    parser.add_argument("--launcher-address", default=None, help="how the hosts reach this machine (default: by route)")
    args = parser.parse_args()

    results = trx.launch(
        where_am_i,
        hostnames=args.hosts,
        workers_per_host=args.workers_per_host,
        ssh_config_file=args.ssh_config,
        env_file=args.env_file,
        launcher_address=args.launcher_address,
        backend="gloo",  # CPU tensors; with GPUs leave the default ("auto": nccl)
    )
    world_size = len(results)
    expected = world_size * (world_size + 1) / 2
    for rank, (hostname, total) in results.items():
        print(f"rank {rank}: host {hostname}, all_reduce sum {total:g} (expected {expected:g})")
    if any(total != expected for _, total in results.values()):
        raise SystemExit("the workers did not agree on the sum")


if __name__ == "__main__":
    main()
