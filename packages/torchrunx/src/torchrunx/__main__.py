"""``python -m torchrunx [launcher flags] script.py [script args]``: the ``torchrunx`` command."""

import sys

from torchrunx.cli import main

# Guarded: a process that re-imports the launcher's __main__ (a spawn child) must not run the command.
if __name__ == "__main__":
    sys.exit(main())
