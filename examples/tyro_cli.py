"""Every Launcher field as a command-line flag, with tyro.

    python examples/tyro_cli.py --help
    python examples/tyro_cli.py --workers-per-host 2 --backend gloo
    python examples/tyro_cli.py --hostnames node1 node2 --workers-per-host 4 --logs runs/today

`tyro.cli(trx.Launcher)` reads the flags into a Launcher; `launcher.run(func, {})` then calls
`func` with no arguments on every worker.
"""

from __future__ import annotations

import os
import socket

import tyro

import torchrunx as trx


def distributed_function() -> str:
    rank, world_size = os.environ["RANK"], os.environ["WORLD_SIZE"]
    print(f"Hello world! from rank {rank} of {world_size}")
    return socket.gethostname()


if __name__ == "__main__":
    launcher = tyro.cli(trx.Launcher)
    results = launcher.run(distributed_function, {})
    for rank, hostname in results.items():
        print(f"rank {rank} ran on {hostname}")
