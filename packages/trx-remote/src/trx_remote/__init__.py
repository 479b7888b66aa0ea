"""trx-remote: how torchrunx reaches hosts.

Implements trx-core's node-executor interface: `LocalExecutor` (this machine),
`AutoExecutor` (local for this machine's names and addresses, SSH otherwise), and the
SSH executor; plus host classification and SLURM discovery.
"""

from .executors import AutoExecutor, LocalExecutor
from .hosts import is_local_host

__all__ = ["AutoExecutor", "LocalExecutor", "is_local_host"]
