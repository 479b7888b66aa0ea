"""Tests too long for the main suite (minutes each). They run in their own CI step
(``./dev hatch run integrations:test``, which sets TORCHRUNX_HEAVY_TESTS=1); the main suite
leaves this folder out."""

import os

collect_ignore_glob = [] if os.environ.get("TORCHRUNX_HEAVY_TESTS") == "1" else ["test_*.py"]
