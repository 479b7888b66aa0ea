"""trx-logging: the torchrunx log layout (per-agent and per-worker files, console rendering)."""
