"""The command that starts an agent on a host, for every executor of this package.

The agent runs under bash so that ``env_file`` can be sourced (it may hold shell logic and
compute node-specific values) right before ``exec``-ing the same Python interpreter as the
launcher, in the same working directory (``scripts/agent.sh``). Paths and arguments are
passed to the script as positional parameters, never pasted into its text, so no value needs
escaping there; the agent's environment is never on its command line either (each executor
sets it apart, where ``ps`` does not show it).

When the agent cannot be started, the script says why on stderr in one line starting with
``torchrunx:`` and naming the host; `describe_end` turns an agent's end into a message.

Every process an executor starts for an agent carries ``AGENT_MARK_VAR=<a token of that
agent>`` in its environment, and inherits it down to the workers' children: what left the
agent's session (a worker's child that called ``setsid``) is still found by it, and killed.
"""

from __future__ import annotations

import secrets
import signal
from importlib.resources import files

from trx_core import AgentSpec

__all__ = ["AGENT_MARK_VAR", "AGENT_SCRIPT", "agent_argv", "agent_mark", "describe_end", "load_script"]

AGENT_MARK_VAR = "TORCHRUNX_AGENT_MARK"
"""The environment variable that marks every process started for one agent."""


def load_script(name: str) -> str:
    """The text of the shell script `name` shipped in ``trx_remote/scripts/``."""
    return files("trx_remote").joinpath("scripts").joinpath(name).read_text(encoding="utf-8")


AGENT_SCRIPT = load_script("agent.sh")
"""The bash script that `agent_argv` runs (``scripts/agent.sh``)."""


def agent_argv(spec: AgentSpec) -> list[str]:
    """The argument vector that starts the agent of `spec` (its environment is set apart)."""
    return ["bash", "-c", AGENT_SCRIPT, "torchrunx-agent", spec.cwd, spec.env_file or "", spec.python, *spec.args]


def agent_mark() -> tuple[str, str]:
    """A fresh ``(AGENT_MARK_VAR, token)`` pair, for the environment of one agent."""
    return AGENT_MARK_VAR, secrets.token_hex(8)


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
