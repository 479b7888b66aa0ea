"""What a worker's exception looks like in the launcher: the "Failures" page shows this output.

    python docs/failure_example.py

Rank 1 of 2 raises a KeyError; the launcher catches it and prints its traceback, which
carries the worker's own traceback as a note. The documentation build runs it.
"""

from __future__ import annotations

import os
import traceback

import torchrunx as trx


def load_shard(shards: dict[int, str]) -> str:
    rank = int(os.environ["RANK"])
    return shards[rank]  # there is no shard for rank 1


if __name__ == "__main__":
    try:
        trx.launch(load_shard, {"shards": {0: "a.bin"}}, hostnames=["localhost"], workers_per_host=2, logs=None,
                   log_console=None)  # fmt: skip
    except KeyError:
        traceback.print_exc()
