"""The launch whose logs the "Logs" page shows: 2 workers on this machine, logging into FOLDER.

    python docs/log_example.py FOLDER

Writes ``FOLDER/torchrunx_logs`` (``.log`` files) and ``FOLDER/jsonl_logs`` (the same run
with ``log_format="jsonl"``). The launcher's console output of the first run is this
script's standard output. The documentation build runs it (see ``_ext/trx_docs.py``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torchrunx as trx


def train(epochs: int) -> float:
    rank = int(os.environ["RANK"])
    print(f"loading shard {rank} of {os.environ['WORLD_SIZE']}")
    loss = 1.0
    for epoch in range(1, epochs + 1):
        loss /= 2
        logging.getLogger("train").info("epoch %d: loss %.3f", epoch, loss)
    if rank == 1:
        logging.warning("rank 1 found 3 corrupt samples and skipped them")
    # What C or C++ code writes straight to the file descriptor is captured too.
    os.write(2, f"[native code] rank {rank} done\n".encode())
    return loss


def main(folder: Path) -> None:
    launcher = trx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo", logs=folder / "torchrunx_logs")
    launcher.run(train, {"epochs": 2})
    launcher.log_format, launcher.log_console, launcher.logs = "jsonl", None, folder / "jsonl_logs"
    launcher.run(train, {"epochs": 2})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
