"""Every message that crosses a process boundary in a run, one frozen dataclass per kind.

Two links carry them, both over `trx_core.channel.Channel` frames (a pickled message plus an
optional opaque blob of user data that is never re-pickled on the way):

- **launcher <-> agent**: one authenticated TCP connection per host;
- **agent <-> worker**: one socket pair per worker (the worker's *control* socket).

Receivers dispatch with ``match``. The table in the documentation ("How it works") is
generated from this module (`message_table`), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "AGENT_TO_LAUNCHER",
    "AGENT_TO_WORKER",
    "LAUNCHER_TO_AGENT",
    "WORKER_TO_AGENT",
    "AgentStopped",
    "Beat",
    "DiscardResult",
    "DumpStacks",
    "EndRun",
    "Hello",
    "LogLine",
    "Logs",
    "Message",
    "Ready",
    "ReportProgress",
    "RunEnded",
    "Signal",
    "StartWorkers",
    "Stop",
    "WorkerExited",
    "WorkerLog",
    "WorkerRaised",
    "WorkerResult",
    "WorkerSpec",
    "WorkerStalled",
    "WorkerStarted",
    "message_table",
    # debugging
    "POST_MORTEM_VAR",
    "DebuggerInput",
    "DebuggerOutput",
    "DebuggerReply",
    "ForWorkers",
    "SendStacks",
    "WorkerPaused",
    "WorkerStacks",
]


class LogLine(NamedTuple):
    """One line of output or one log message, as it travels in `Logs` (a tuple, for speed)."""

    time: float
    local_rank: int | None  # None: the agent's own message
    stream: str  # "stdout", "stderr", "logging" or "agent"
    level: int
    message: str
    logger: str


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs, besides the function payload."""

    rank: int
    local_rank: int
    env: Mapping[str, str]
    """Variables set in the worker's environment (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    backend: str | None
    timeout: int
    sys_path: tuple[str, ...] = ()
    """The launcher's ``sys.path``: what imports there, imports here (same paths permitting)."""
    hang_timeout: float | None = None
    """Report the worker as stalled once its main thread stays put this long (None: never)."""
    argv: tuple[str, ...] = ()
    """The launcher's ``sys.argv``, which the worker's ``sys.argv`` becomes."""
    main_path: str | None = None
    """The launcher's ``__main__`` script, which the worker's ``__main__`` mirrors (None: none)."""
    unset: tuple[str, ...] = ()
    """Variables removed from the worker's environment (in a warm session: those the launcher's
    environment no longer has since the agents started)."""


# -- launcher -> agent ------------------------------------------------------------------
@dataclass(frozen=True)
class StartWorkers:
    """Fork these workers; the blob is the pickled function and arguments, shared by all."""

    workers: tuple[WorkerSpec, ...]


@dataclass(frozen=True)
class DumpStacks:
    """A rank looks hung: every worker writes its stack to its log and reports how long it is stuck."""


@dataclass(frozen=True)
class Signal:
    """The launcher received this signal (SIGTERM, SIGUSR1, SIGUSR2): send it to every worker still
    running, e.g. so that a training loop can save a checkpoint before the run is stopped."""

    signum: int


@dataclass(frozen=True)
class Stop:
    """Kill every worker, forward what they wrote, say `AgentStopped` and exit."""


@dataclass(frozen=True)
class EndRun:
    """In a warm session: kill this run's workers, forward what they wrote, start a fresh
    rendezvous store (the agent that hosts it), say `RunEnded` and wait for the next run."""


@dataclass(frozen=True)
class Beat:
    """Heartbeat, both ways: sent after a second without any other message."""


# -- agent -> launcher ------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """The agent's first words once authenticated; heartbeats follow from then on, also while
    it imports torch."""

    host_index: int
    hostname: str
    pid: int


@dataclass(frozen=True)
class Ready:
    """The agent has imported torch: what the launcher needs to plan its workers."""

    gpus: int
    cpus: int
    port: int
    """The rendezvous store's port when this agent hosts it, else a port free on its host."""
    hosts_store: bool = False
    started: float = 0.0
    """When the agent's process started (``time.time()`` on its host)."""
    connected: float = 0.0
    """When it had connected to the launcher; it is ready now."""


@dataclass(frozen=True)
class Logs:
    """Lines of output and log messages of the agent and its workers, in order per worker."""

    lines: tuple[LogLine, ...]


@dataclass(frozen=True)
class WorkerExited:
    """A worker ended; `how` is e.g. ``exit code 0`` or ``killed by signal SIGKILL``."""

    local_rank: int
    how: str


@dataclass(frozen=True)
class DiscardResult:
    """The result or exception of this worker was cut short by its death: drop it."""

    local_rank: int


@dataclass(frozen=True)
class AgentStopped:
    """The agent stopped its workers and is exiting; `reason` says why when it was not asked to."""

    reason: str = ""


# -- worker -> agent (relayed unchanged to the launcher where noted) ---------------------
@dataclass(frozen=True)
class RunEnded:
    """The run's workers and their children are gone; the agent is idle (its log says how much
    memory it holds). `port`: the fresh rendezvous store for the next run (agent that hosts it)."""

    port: int


@dataclass(frozen=True)
class WorkerResult:
    """The function returned; the blob is its pickled return value. Relayed to the launcher."""

    local_rank: int


@dataclass(frozen=True)
class WorkerRaised:
    """The function raised; the blob is the pickled exception (empty if it would not pickle).
    Relayed to the launcher."""

    local_rank: int
    type_name: str
    message: str
    traceback: str


@dataclass(frozen=True)
class WorkerStalled:
    """The worker's main thread has not moved for `seconds`, at `where`. Relayed to the launcher."""

    local_rank: int
    seconds: float
    where: str


@dataclass(frozen=True)
class WorkerStarted:
    """The worker is about to call the function: when it was forked, and when its process group
    was formed (``time.time()`` on its host). Relayed to the launcher."""

    local_rank: int
    forked: float
    group_formed: float


@dataclass(frozen=True)
class WorkerLog:
    """A Python logging record of the worker (the agent batches these into `Logs`)."""

    time: float
    level: int
    logger: str
    message: str


# -- agent -> worker --------------------------------------------------------------------
@dataclass(frozen=True)
class ReportProgress:
    """Write your stack to your log and send `WorkerStalled` with how long you have been stuck."""


# -- debugging (trx_core._debug_worker, trx_core._debug_console) -------------------------
POST_MORTEM_VAR = "TORCHRUNX_POST_MORTEM"
"""Set to 1 in the workers' environment by ``Launcher(post_mortem=True)``."""


@dataclass(frozen=True)
class ForWorkers:
    """Pass `message` on, unchanged, to the workers of these local ranks (every worker when
    empty): how the launcher speaks to workers (`DebuggerReply`, `DebuggerInput`, `SendStacks`)."""

    local_ranks: tuple[int, ...]
    message: Message


@dataclass(frozen=True)
class WorkerPaused:
    """The worker stopped at `breakpoint()` (or, with post_mortem, on an exception) at `where`,
    and waits for `DebuggerReply` before opening pdb. Relayed to the launcher."""

    local_rank: int
    where: str
    why: str


@dataclass(frozen=True)
class DebuggerReply:
    """Whether to open pdb for `WorkerPaused` (with the launcher's terminal), or go on (`reason`)."""

    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class DebuggerOutput:
    """What the worker's pdb wrote; `prompt` not None: pdb now waits for a command line with this
    prompt. Relayed to the launcher."""

    local_rank: int
    text: str
    prompt: str | None


@dataclass(frozen=True)
class DebuggerInput:
    """A command line typed in the launcher's terminal, for the worker's pdb."""

    line: str


@dataclass(frozen=True)
class SendStacks:
    """Send the Python stack of each of your threads to the launcher (`WorkerStacks`)."""


@dataclass(frozen=True)
class WorkerStacks:
    """The worker's threads (name, stack innermost last) when `SendStacks` came. Relayed to the launcher."""

    local_rank: int
    threads: tuple[tuple[str, str], ...]


Message = (
    StartWorkers
    | DumpStacks
    | Signal
    | Stop
    | EndRun
    | Beat
    | Hello
    | Ready
    | Logs
    | WorkerExited
    | DiscardResult
    | AgentStopped
    | RunEnded
    | WorkerResult
    | WorkerRaised
    | WorkerStalled
    | WorkerStarted
    | WorkerLog
    | ReportProgress
    | ForWorkers
    | WorkerPaused
    | DebuggerReply
    | DebuggerOutput
    | DebuggerInput
    | SendStacks
    | WorkerStacks
)

LAUNCHER_TO_AGENT: tuple[type, ...] = (StartWorkers, DumpStacks, Signal, Stop, EndRun, Beat, ForWorkers)
AGENT_TO_LAUNCHER: tuple[type, ...] = (
    Hello,
    Ready,
    Logs,
    WorkerStarted,
    WorkerResult,
    WorkerRaised,
    WorkerStalled,
    DiscardResult,
    WorkerExited,
    AgentStopped,
    RunEnded,
    Beat,
    WorkerPaused,
    DebuggerOutput,
    WorkerStacks,
)
WORKER_TO_AGENT: tuple[type, ...] = (
    WorkerStarted,
    WorkerResult,
    WorkerRaised,
    WorkerStalled,
    WorkerLog,
    WorkerPaused,
    DebuggerOutput,
    WorkerStacks,
)
AGENT_TO_WORKER: tuple[type, ...] = (ReportProgress, DebuggerReply, DebuggerInput, SendStacks)


def message_table() -> str:
    """A Markdown table of every message: direction, name, fields, meaning (for the docs)."""
    rows = ["| direction | message | fields | meaning |", "|---|---|---|---|"]
    for direction, kinds in (
        ("launcher → agent", LAUNCHER_TO_AGENT),
        ("agent → launcher", AGENT_TO_LAUNCHER),
        ("worker → agent", WORKER_TO_AGENT),
        ("agent → worker", AGENT_TO_WORKER),
    ):
        for kind in kinds:
            fields = ", ".join(f"`{f.name}`" for f in dataclasses.fields(kind)) or "—"
            meaning = " ".join((kind.__doc__ or "").split())
            rows.append(f"| {direction} | `{kind.__name__}` | {fields} | {meaning} |")
    return "\n".join(rows)
