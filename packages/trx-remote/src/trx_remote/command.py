"""The command that starts an agent on a host, for every executor of this package.

The agent runs under bash so that ``env_file`` can be sourced (it may hold shell logic and
compute node-specific values) right before ``exec``-ing the same Python interpreter as the
launcher, in the same working directory. Paths and arguments are passed to the script as
positional parameters, never pasted into its text, so no value needs escaping there.
"""

from __future__ import annotations

import shlex

from trx_core import AgentSpec

__all__ = ["AGENT_SCRIPT", "EXIT_BAD_CWD", "EXIT_BAD_ENV_FILE", "EXIT_NO_PYTHON", "agent_argv", "agent_shell_command"]

EXIT_BAD_CWD = 97
EXIT_BAD_ENV_FILE = 98
EXIT_NO_PYTHON = 99

# $1 = working directory, $2 = env_file ("" for none), $3... = python and its arguments.
AGENT_SCRIPT = f"""\
host=$(hostname)
cd -- "$1" 2>/dev/null || {{ echo "torchrunx: working directory $1 does not exist on host $host" >&2; exit {EXIT_BAD_CWD}; }}
if [ -n "$2" ]; then
  [ -f "$2" ] && [ -r "$2" ] || {{ echo "torchrunx: env_file $2 is missing or not readable on host $host" >&2; exit {EXIT_BAD_ENV_FILE}; }}
  source "$2" || {{ status=$?; echo "torchrunx: sourcing env_file $2 failed with status $status on host $host" >&2; exit {EXIT_BAD_ENV_FILE}; }}
fi
command -v "$3" >/dev/null 2>&1 || {{ echo "torchrunx: python interpreter $3 not found on host $host" >&2; exit {EXIT_NO_PYTHON}; }}
shift 2
exec "$@"
"""


def agent_argv(spec: AgentSpec) -> list[str]:
    """The argument vector that starts the agent of `spec` (its environment is set apart)."""
    return ["bash", "-c", AGENT_SCRIPT, "torchrunx-agent", spec.cwd, spec.env_file or "", spec.python, *spec.args]


def agent_shell_command(spec: AgentSpec) -> str:
    """One shell command line, for remote shells: exports `spec.env`, then runs `agent_argv`."""
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in spec.env.items() if name.isidentifier())
    return exports + shlex.join(agent_argv(spec))
