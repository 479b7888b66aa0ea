"""The command that starts an agent on a host, for every executor of this package.

The agent runs under bash so that ``env_file`` can be sourced (it may hold shell logic and
compute node-specific values) right before ``exec``-ing the same Python interpreter as the
launcher, in the same working directory. Paths and arguments are passed to the script as
positional parameters, never pasted into its text, so no value needs escaping there.

When the agent cannot be started, the script says why on stderr in one line starting with
``torchrunx:`` and naming the host; `describe_end` turns an agent's end into a message.
"""

from __future__ import annotations

import signal

from trx_core import AgentSpec

__all__ = ["AGENT_SCRIPT", "agent_argv", "describe_end"]

# $1 = working directory, $2 = env_file ("" for none), $3... = python and its arguments.
# The env_file runs with no arguments, stdin from /dev/null (stdin carries the run's secret,
# for the agent) and may `exit`, `set -e`, `shift` or overwrite variables: the script keeps
# what it needs under names no env_file uses, and an EXIT trap reports an env_file that ends
# the shell.
AGENT_SCRIPT = """\
__trx_host=${HOSTNAME:-$(hostname)}
cd -- "$1" 2>/dev/null || { echo "torchrunx: working directory $1 does not exist on host $__trx_host" >&2; exit 97; }
__trx_env_file=$2
shift 2
__trx_agent=("$@")
if [ -n "$__trx_env_file" ]; then
  if ! [ -f "$__trx_env_file" ] || ! [ -r "$__trx_env_file" ]; then
    echo "torchrunx: env_file $__trx_env_file is missing or not readable on host $__trx_host" >&2
    exit 98
  fi
  trap '__trx_status=$?; echo "torchrunx: env_file $__trx_env_file exited with status $__trx_status \
on host $__trx_host" >&2' EXIT
  set --
  source "$__trx_env_file" </dev/null
  __trx_status=$?
  trap - EXIT
  if [ "$__trx_status" != 0 ]; then
    echo "torchrunx: env_file $__trx_env_file failed with status $__trx_status on host $__trx_host" >&2
    exit 98
  fi
fi
if ! command -v "${__trx_agent[0]}" >/dev/null 2>&1; then
  echo "torchrunx: python interpreter ${__trx_agent[0]} not found on host $__trx_host" >&2
  exit 99
fi
exec "${__trx_agent[@]}"
"""


def agent_argv(spec: AgentSpec) -> list[str]:
    """The argument vector that starts the agent of `spec` (its environment is set apart)."""
    return ["bash", "-c", AGENT_SCRIPT, "torchrunx-agent", spec.cwd, spec.env_file or "", spec.python, *spec.args]


def describe_end(status: int, tail: str, python: str) -> str:
    """How an agent ended, for `AgentProcess.poll`: `status` is its exit code, or minus the
    signal that killed it; `tail` is the end of its output."""
    lines = tail.strip().splitlines()
    ours = [line for line in lines if line.startswith("torchrunx: ")]
    if ours:  # the script could not start the agent, and said why
        return (
            "could not start the agent: "
            + "; ".join(line.removeprefix("torchrunx: ") for line in ours)
            + _also([line for line in lines if line not in ours])
        )
    if "No module named trx_core" in tail or "No module named 'trx_core'" in tail:
        return (
            f"torchrunx is not installed for {python} on this host ({lines[-1]}): install it there, or launch "
            "from a Python environment that exists at the same path on every host"
        )
    if status < 0:
        try:
            how = f"the agent was killed by signal {signal.Signals(-status).name}"
        except ValueError:
            how = f"the agent was killed by signal {-status}"
    else:
        how = f"the agent exited with code {status}"
    return how + (f": {tail.strip()}" if tail.strip() else "")


def _also(lines: list[str]) -> str:
    return f" (output: {' | '.join(lines[-5:])})" if lines else ""
