"""trx-logging: the torchrunx log layout (per-agent and per-worker files, console rendering).

Installed, it is trx-core's default log pipeline (entry point ``default`` in the group
``torchrunx.log_pipelines``): every run writes ``<start>_<host>.log`` per agent and
``<start>_<host>_<local rank>.log`` per worker into the launcher's ``logs`` folder, and shows
agent 0's log on the console. Records are structlog event dicts; `add_sink` sends them
elsewhere too.
"""

from .layout import LogLayout, factory
from .sinks import Sink, SinkRegistration, add_sink

__all__ = ["LogLayout", "Sink", "SinkRegistration", "add_sink", "factory"]
