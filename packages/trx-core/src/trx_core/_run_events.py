"""What the launcher does with each message from an agent: the record of a run's results,
exits, failures and stalls, and the signals it received.

`RunEvents` is the part of `trx_core.supervisor.Supervisor` that keeps that record; the
supervisor itself starts, times and stops things.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import selectors
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from . import _pickling, plan
from ._signals import SignalCatcher
from .channel import Channel, ChannelClosed
from .errors import (
    AgentFailedError,
    Failure,
    WorkerExitError,
    WorkerFailedError,
    attach_remote_traceback,
    worker_exception,
)
from .executor import AgentProcess
from .gate import Arrival
from .logs import LogPipeline, LogRecord, RunInfo
from .protocol import (
    AgentStopped,
    DebuggerOutput,
    DiscardResult,
    DumpStacks,
    Hello,
    Logs,
    Message,
    Ready,
    RunEnded,
    Signal,
    StartWorkers,
    Stop,
    WorkerExited,
    WorkerPaused,
    WorkerRaised,
    WorkerResult,
    WorkerStacks,
    WorkerStalled,
    WorkerStarted,
)

if TYPE_CHECKING:
    from ._debug_console import DebugConsole

__all__ = ["AgentHandle", "Phase", "RunEvents", "RunSettings"]

_GATHER_S = 0.05
_HANG_GATHER_S = 1.0


class Phase(enum.Enum):
    """Where a run is."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    ENDING = "ending"  # a session's agents are killing the run's workers; they stay
    IDLE = "idle"  # a session's agents are ready for the next run
    STOPPING = "stopping"
    DONE = "done"


@dataclass(frozen=True)
class RunSettings:
    """The launcher settings the supervisor itself uses."""

    backend: str | None
    workers_per_host: plan.WorkersPerHost
    timeout: int
    hang_timeout: float | None
    heartbeat_timeout: float
    env: dict[str, str]
    env_file: str | None
    python: str
    cwd: str
    worker: plan.WorkerSettings
    signal_grace: float = 30.0
    """Seconds the workers get, after a signal was sent on to them, before the run is stopped."""


@dataclass
class AgentHandle:
    """The launcher's view of one host's agent."""

    index: int
    hostname: str
    launcher_address: str
    process: AgentProcess | None = None
    channel: Channel | None = None
    hello: Hello | None = None
    ready: Ready | None = None
    peer_address: str = ""
    ranks: list[int] = field(default_factory=list)
    finished: bool = False  # said it stopped, or closed after we asked it to stop
    started_at: float = 0.0  # when its executor had started it
    idle: bool = False  # in a session: the last run's workers are gone (RunEnded)


class RunEvents:
    """The record of a run, and what each message from an agent does to it."""

    settings: RunSettings
    worker: plan.WorkerSettings  # the current run's
    pipeline: LogPipeline
    phase: Phase
    keep_agents: bool
    lost: str
    interrupted: bool
    agents: list[AgentHandle]
    placement: list[tuple[str, int]]  # rank -> (hostname, local rank)
    results: dict[int, bytearray]
    exits: dict[int, str]
    failures: list[Failure]
    stalled: dict[int, tuple[str, float, str]]  # rank -> (host, seconds, where)
    signals: list[int]  # received while the run was in progress, in order
    forwarded: bool  # whether they were sent on to the workers
    signal_catcher: SignalCatcher
    workers_started: int
    stop_at: float | None  # when to stop all agents, once something failed
    hang_at: float | None  # when to fail the run as hung

    selector: selectors.BaseSelector
    payload: list[memoryview]
    start_time: datetime
    _pipeline_open: bool
    debug: DebugConsole

    # Provided by the supervisor.
    def _phase_done(self, phase: str) -> None:
        raise NotImplementedError

    def _stop_all(self) -> None:
        raise NotImplementedError

    def _send(self, agent: AgentHandle, message: Message, *blob: memoryview) -> None:
        raise NotImplementedError

    def _emit_record(self, record: LogRecord) -> None:
        raise NotImplementedError

    def _open_pipeline(self, info: RunInfo) -> None:
        raise NotImplementedError

    # -- agents arriving --------------------------------------------------------------
    def _welcome(self, arrival: Arrival) -> None:
        index = arrival.hello.host_index
        if not (0 <= index < len(self.agents)) or self.agents[index].channel is not None:
            arrival.channel.close()
            return
        agent = self.agents[index]
        agent.channel, agent.hello, agent.peer_address = arrival.channel, arrival.hello, arrival.peer_address
        self.selector.register(arrival.channel.sock, selectors.EVENT_READ, ("agent", agent))
        if self.phase is Phase.STOPPING:
            self._send(agent, Stop())
        if all(a.hello is not None for a in self.agents):
            self._phase_done("agents connected")

    def _agent_ready(self, agent: AgentHandle, ready: Ready) -> None:
        agent.ready = ready
        agent.idle = True
        if self.phase is Phase.STARTING and all(a.ready is not None for a in self.agents):
            self._phase_done("agents ready")
            if self.payload:
                self._start_workers()
            else:
                self.phase = Phase.IDLE  # a session started, its first run not asked for yet

    def _start_workers(self) -> None:
        readies = [a.ready for a in self.agents if a.ready is not None]
        reports = [plan.HostReport(a.hostname, r.gpus, r.cpus) for a, r in zip(self.agents, readies, strict=True)]
        hostnames = [a.hostname for a in self.agents]
        plan.check_backend(self.settings.backend, hostnames, reports)
        counts = plan.worker_counts(self.settings.workers_per_host, reports)
        self._open_pipeline(RunInfo(self.start_time, hostnames, counts))
        agent0 = self.agents[0]
        host0_is_local = plan.is_loopback(agent0.launcher_address)
        rendezvous = plan.rendezvous_addresses(
            [a.launcher_address for a in self.agents], agent0.peer_address, host0_is_local, readies[0].port
        )
        workers = plan.plan_workers(counts, rendezvous, self.worker)
        self.placement = plan.placement(hostnames, counts)
        self.phase = Phase.RUNNING
        for agent, specs in zip(self.agents, workers, strict=True):
            agent.ranks = [spec.rank for spec in specs]
            agent.idle = False
            self._send(agent, StartWorkers(specs), *self.payload)
        self._phase_done("workers started")

    # -- events from agents -----------------------------------------------------------
    def _from_agent(self, agent: AgentHandle) -> None:
        assert agent.channel is not None
        try:
            message, blob = agent.channel.recv()
        except ChannelClosed as e:
            self._agent_gone(agent, f"its connection to the launcher {e.how()}")
            return
        match message:
            case Ready():
                self._agent_ready(agent, message)
            case WorkerStarted():
                self.workers_started += 1
                if self.workers_started == len(self.placement):
                    self._phase_done("group formed")
            case Logs(lines):
                self._emit(agent, lines)
            case WorkerResult(local_rank):
                self.results[agent.ranks[local_rank]] = blob
            case WorkerRaised():
                self._worker_raised(agent, message, blob)
            case WorkerStalled(local_rank, seconds, where):
                self._worker_stalled(agent.ranks[local_rank], agent.hostname, seconds, where)
            case DiscardResult(local_rank):
                self.results.pop(agent.ranks[local_rank], None)
            case WorkerExited(local_rank, how):
                self._worker_exited(agent, local_rank, how)
            case RunEnded(port):
                agent.idle = True
                if port and agent.ready is not None:
                    agent.ready = dataclasses.replace(agent.ready, port=port)  # the next run's fresh store
            case AgentStopped(reason):
                self._agent_gone(agent, reason, explained=bool(reason))
            case WorkerPaused() | DebuggerOutput() | WorkerStacks():
                self.debug.from_worker(agent, message)

    def _emit(self, agent: AgentHandle, lines: Sequence[tuple[float, int | None, str, int, str, str]]) -> None:
        for created, local_rank, stream, level, text, logger in lines:
            rank = agent.ranks[local_rank] if local_rank is not None and local_rank < len(agent.ranks) else None
            self._emit_record(LogRecord(created, agent.hostname, local_rank, rank, stream, level, text, logger))

    def _worker_raised(self, agent: AgentHandle, raised: WorkerRaised, blob: bytearray) -> None:
        rank = agent.ranks[raised.local_rank]
        decoded: BaseException | None = None
        problem = "it could not be pickled in the worker"
        if blob:
            try:
                decoded = _pickling.loads(blob)
            except Exception as e:
                problem = f"it could not be unpickled in the launcher: {type(e).__name__}: {e}"
        exception = worker_exception(
            decoded, raised.type_name, raised.message, problem, agent.hostname, raised.local_rank, rank
        )
        where = f"host {agent.hostname!r}, rank {rank} (local rank {raised.local_rank})"
        attach_remote_traceback(exception, where, raised.traceback)
        if isinstance(exception, WorkerExitError):  # sys.exit(): the exit status is what ended it
            self.exits.setdefault(rank, exception.how)
            self._fail(exception, str(exception))
            return
        self.exits.setdefault(rank, "raised an exception")
        self._fail(exception, f"rank {rank} on {agent.hostname!r} raised {raised.type_name}: {raised.message}")

    def _worker_stalled(self, rank: int, hostname: str, seconds: float, where: str) -> None:
        if self.debug.holds_ranks():
            return  # a rank stopped in the debugger: its peers wait for it, they are not hung
        self.stalled[rank] = (hostname, seconds, where)
        if self.hang_at is None and self.phase is Phase.RUNNING:
            # Have every worker write its stack to its log and say how long it has been stuck,
            # so that the error names every stuck rank, not only the first to notice.
            for other in self.agents:
                if other.channel is not None and not other.finished:
                    self._send(other, DumpStacks())
            self.hang_at = time.monotonic() + _HANG_GATHER_S

    def _worker_exited(self, agent: AgentHandle, local_rank: int, how: str) -> None:
        rank = agent.ranks[local_rank]
        if rank in self.exits:
            return
        self.exits[rank] = how
        if rank not in self.results:
            error = WorkerFailedError(agent.hostname, local_rank, rank, how)
            self._fail(error, str(error))

    def _agent_process_ended(self, agent: AgentHandle) -> None:
        assert agent.process is not None
        self.selector.unregister(agent.process.fileno())
        if agent.channel is not None:
            return  # its connection tells the rest (and may still hold unread output)
        self._agent_gone(agent, agent.process.poll() or "it exited")

    def _agent_gone(self, agent: AgentHandle, reason: str, explained: bool = False) -> None:
        """The agent's connection is gone; unless we asked for that, the run fails, saying
        why: as the agent explained it, else as its executor saw it end, else `reason`."""
        if agent.channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(agent.channel.sock)
            agent.channel.close()
            agent.channel = None
        unexpected = not agent.finished and self.phase is not Phase.STOPPING
        if unexpected and agent.process is not None and not explained:
            time.sleep(0.05)  # let the executor see the exit status, for a better message
            reason = agent.process.poll() or reason
        if self.keep_agents and not self.lost and unexpected:
            self.lost = f"the agent on {agent.hostname!r} was lost: {reason or 'it exited'}"
        if unexpected and self.phase in (Phase.STARTING, Phase.RUNNING):
            error = AgentFailedError(agent.hostname, reason or "it exited")
            self._fail(error, str(error))
        agent.finished = True

    # -- signals ----------------------------------------------------------------------
    def _on_signals(self) -> None:
        for signum in self.signal_catcher.read():
            if signum == signal.SIGINT:  # caught in a session only: stop the run, keep the agents
                self.interrupted = True
                self._stop_all()
                continue
            if not self.signals and (self.failures or self.phase not in (Phase.STARTING, Phase.RUNNING)):
                # The outcome is known already: nothing to interrupt. The program's own handler
                # (by default: the end of the process) gets the signal once the run is cleaned up.
                self.signal_catcher.late.append(signum)
                continue
            self.signals.append(signum)
            if self.phase is Phase.STARTING:
                self._stop_all()  # no worker to warn yet
            elif self.phase is Phase.RUNNING:
                self.forwarded = True
                for agent in self.agents:
                    if agent.channel is not None and not agent.finished:
                        self._send(agent, Signal(signum))
                if self.stop_at is None:
                    self.stop_at = time.monotonic() + self.settings.signal_grace

    def _ranks_running(self) -> list[int]:
        """Ranks that have not ended and whose agent is still there."""
        return [rank for agent in self.agents if not agent.finished for rank in agent.ranks if rank not in self.exits]

    def _fail(self, exception: BaseException, summary: str) -> None:
        self.failures.append(Failure(exception, summary))
        if self.stop_at is None:
            # Ranks hitting the same bug raise within moments of each other: gather them
            # briefly so that one error reports them all. A death needs no such wait.
            raised = not isinstance(exception, (WorkerFailedError, AgentFailedError))
            self.stop_at = time.monotonic() + (_GATHER_S if raised else 0.0)
