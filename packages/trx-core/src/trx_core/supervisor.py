"""The launcher side of a run: start one agent per host, follow them, end in a result or an error.

A `Supervisor` goes through explicit phases (`Phase`): STARTING (agents started, waiting for
each to say hello), RUNNING (workers started, results and failures arriving), STOPPING (every
agent asked to stop, waiting for them to go) and DONE. Use it as a context manager::

    with Supervisor(...) as run:
        run.start()
        results = run.wait()

`close()` (also on leaving the ``with`` block) stops every agent and releases every socket,
whatever the phase. Everything happens in one selector loop in the caller's thread.

Signals: from `start()` to `close()`, in the main thread only (where Python runs signal
handlers), SIGTERM, SIGUSR1 and SIGUSR2 sent to this process are caught. One that arrives
while workers run is sent on to every worker (`Signal`), and the run is stopped when they have
all ended or after `RunSettings.signal_grace` seconds, raising `RunInterrupted`; before the
workers start, it stops the run at once. One that arrives once the run's outcome is known
(every rank ended, or a failure is being reported) is delivered again after `close()`, to the
handler the program had before. SIGINT is left alone: Ctrl-C raises KeyboardInterrupt, and
`close()` stops everything.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import selectors
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType, TracebackType
from typing import Any, TypeVar

from . import _pickling, plan, processes
from .channel import HEARTBEAT_S, Channel, ChannelClosed
from .errors import (
    AgentFailedError,
    Failure,
    ResultUnpicklingError,
    RunInterrupted,
    WorkerExitError,
    WorkerFailedError,
    WorkerHungError,
    add_note,
    attach_remote_traceback,
    combine_failures,
    worker_exception,
)
from .executor import AgentProcess, AgentSpec, NodeExecutor
from .gate import AgentGate, Arrival
from .logs import LogPipeline, LogRecord, RunInfo
from .protocol import (
    AgentStopped,
    Beat,
    DiscardResult,
    DumpStacks,
    Hello,
    Logs,
    Ready,
    Signal,
    StartWorkers,
    Stop,
    WorkerExited,
    WorkerRaised,
    WorkerResult,
    WorkerStalled,
    WorkerStarted,
)
from .results import LaunchResult

__all__ = ["Phase", "RunSettings", "Supervisor"]

_STOP_GRACE_S = 3.0
_GATHER_S = 0.05
_HANG_GATHER_S = 1.0
# Sent on to the workers; SIGINT is not: Ctrl-C stops the run at once (KeyboardInterrupt).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


_Handler = Callable[[int, FrameType | None], Any] | int | None


class Phase(enum.Enum):
    """Where a run is."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
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
class _Agent:
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


class Supervisor:
    """One run, from starting its agents to its result. Owns every agent, socket and the pipeline."""

    def __init__(
        self,
        settings: RunSettings,
        hostnames: Sequence[str],
        launcher_addresses: Sequence[str],
        executor: NodeExecutor,
        pipeline: LogPipeline,
        payload: list[memoryview],
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.pipeline = pipeline
        self.payload = payload
        self.phase = Phase.NEW
        self.start_time = datetime.now()
        self.secret = secrets.token_bytes(32)
        self.agents = [_Agent(i, h, a) for i, (h, a) in enumerate(zip(hostnames, launcher_addresses, strict=True))]
        self.selector = selectors.DefaultSelector()
        self.gate: AgentGate | None = None
        self.placement: list[tuple[str, int]] = []  # rank -> (hostname, local rank)
        self.results: dict[int, bytearray] = {}
        self.exits: dict[int, str] = {}
        self.failures: list[Failure] = []
        self.stalled: dict[int, tuple[str, float, str]] = {}  # rank -> (host, seconds, where)
        self.deadline = 0.0  # of the current phase: agents started / agents gone
        self.stop_at: float | None = None  # when to stop all agents, once something failed
        self.hang_at: float | None = None  # when to fail the run as hung
        self.signals: list[int] = []  # received while the run was in progress, in order
        self.forwarded = False  # whether it was sent on to the workers
        self._pipeline_open = False
        self.began = 0.0  # time.monotonic() at start()
        self.phases: dict[str, float] = {}  # phase -> seconds from `began` to its end
        self.workers_started = 0  # ranks that reported their process group formed
        self._signal_pipe: tuple[int, int] | None = None  # written by the signal handler: (read, write)
        self._previous_handlers: dict[int, _Handler] = {}
        self._redeliver: list[int] = []  # arrived once the outcome was known: the previous handler's

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Open the gate and start every agent (in parallel); raise if one cannot be started."""
        self._catch_signals()
        self.began = time.monotonic()
        loopback = all(plan.is_loopback(a.launcher_address) for a in self.agents)
        self.gate = AgentGate(self.selector, "127.0.0.1" if loopback else "", self.secret)
        store = plan.store_bind_address([a.launcher_address for a in self.agents])
        self.phase = Phase.STARTING
        self.deadline = time.monotonic() + self.settings.timeout

        def start(agent: _Agent) -> AgentProcess:
            assert self.gate is not None
            args = plan.agent_args(
                agent.launcher_address,
                self.gate.port,
                agent.index,
                self.settings.heartbeat_timeout,
                store if agent.index == 0 else None,
                processes.identity(os.getpid()),
            )
            spec = AgentSpec(
                hostname=agent.hostname,
                python=self.settings.python,
                args=args,
                cwd=self.settings.cwd,
                env=self.settings.env,
                env_file=self.settings.env_file,
                stdin=self.secret.hex().encode() + b"\n",
            )
            return self.executor.start(spec)

        outcomes = _each(start, self.agents)
        self._phase_done("agents started")
        errors = []
        for agent, (process, error) in zip(self.agents, outcomes, strict=True):
            if process is not None:
                agent.process = process
                agent.started_at = time.monotonic()
                self.selector.register(process.fileno(), selectors.EVENT_READ, ("process", agent))
            else:
                errors.append(AgentFailedError(agent.hostname, f"could not start the agent: {error}"))
        if errors:
            for e in errors[1:]:
                add_note(errors[0], f"also: {e}")
            raise errors[0]

    def wait(self) -> LaunchResult:
        """Follow the run until every rank returned, or until it failed (then raise)."""
        while self.phase is not Phase.DONE:
            events = self.selector.select(self._next_timeout())
            # Signals first: they explain what may come with them (SLURM ends a job's steps with
            # the SIGTERM it sends the launcher, so an agent may be gone in the same batch).
            self._on_signals()
            for key, _ in events:
                if self.selector.get_map().get(key.fileobj) is not key:
                    continue  # closed while an earlier event of this batch was handled
                kind, agent = key.data
                if kind == "agent":
                    self._from_agent(agent)
                elif kind == "process":
                    self._agent_process_ended(agent)
                elif self.gate is not None and self.gate.owns(key.data):
                    arrival = self.gate.on_ready(key)
                    if arrival is not None:
                        self._welcome(arrival)
            self._tick(time.monotonic())
        self._raise_if_interrupted()
        if self.failures:
            raise combine_failures(self.failures)
        values, broken = {}, {}
        for rank, blob in self.results.items():
            try:
                values[rank] = _pickling.loads(blob)
            except Exception as e:  # e.g. a class that only the workers' hosts can import
                broken[rank] = e
        if broken:
            raise ResultUnpicklingError(broken, LaunchResult(values, self.placement))
        self._phase_done("returned")
        return LaunchResult(values, self.placement, self.phases)

    def close(self) -> None:
        """Stop every agent and release every socket of the run. Safe to call at any point."""
        try:
            for agent in self.agents:
                if agent.channel is not None and not agent.finished:
                    with contextlib.suppress(ChannelClosed):
                        agent.channel.send(Stop())
            _each(lambda process: process.stop(), [a.process for a in self.agents if a.process is not None])
            for agent in self.agents:
                if agent.channel is not None:
                    agent.channel.close()
        finally:
            try:
                if self.gate is not None:
                    self.gate.close()
                self.selector.close()
                if self._pipeline_open:
                    self._pipeline_open = False
                    self.pipeline.close()
                self.phase = Phase.DONE
            finally:
                self._release_signals()

    # -- time -------------------------------------------------------------------------
    def _next_timeout(self) -> float:
        """Until the most pressing deadline; at most one heartbeat interval."""
        pressing = [t for t in (self.stop_at, self.hang_at) if t is not None]
        if self.phase in (Phase.STARTING, Phase.STOPPING):
            pressing.append(self.deadline)
        if not pressing:
            return HEARTBEAT_S
        return max(0.0, min(min(pressing) - time.monotonic(), HEARTBEAT_S))

    def _tick(self, now: float) -> None:
        if self.gate is not None:
            self.gate.expire(now)
        self._heartbeat(now)
        if self.phase is Phase.STOPPING:
            if now > self.deadline or all(a.finished for a in self.agents):
                self.phase = Phase.DONE
            return
        if self.hang_at is not None and now >= self.hang_at:
            self.hang_at = None
            bound = self.settings.hang_timeout or 0
            stuck = {rank: state for rank, state in self.stalled.items() if state[1] >= bound / 2}
            error = WorkerHungError(stuck, bound)
            self._fail(error, str(error).splitlines()[0])
        if self.phase is Phase.STARTING:
            self._check_started(now)
        if self.phase is Phase.STARTING and now > self.deadline:
            missing = [a.hostname for a in self.agents if a.ready is None]
            self._fail(AgentFailedError(missing[0], f"was not ready within timeout={self.settings.timeout} s"), "")
            self._stop_all()
        if self.phase is Phase.RUNNING and self.placement and len(self.exits) == len(self.placement):
            self._stop_all()  # every rank has ended
        if self.stop_at is not None and now >= self.stop_at:
            self._stop_all()
        if self.forwarded and self.phase is Phase.RUNNING and not self._ranks_running():
            self._stop_all()  # every rank ended, or lost its agent, within the grace period

    def _phase_done(self, phase: str) -> None:
        self.phases[phase] = round(time.monotonic() - self.began, 4)

    def _check_started(self, now: float) -> None:
        """An agent says hello right after connecting (before it imports torch, and heartbeats
        from then on): one started that has not is frozen or cannot run."""
        bound = self.settings.heartbeat_timeout
        for agent in self.agents:
            silent = agent.hello is None and agent.process is not None and not agent.finished
            if silent and now - agent.started_at > bound:
                reason = f"it did not connect back within heartbeat_timeout={bound:g} s of being started"
                self._fail(AgentFailedError(agent.hostname, reason), "")
                self._stop_all()
                return

    def _heartbeat(self, now: float) -> None:
        """Tell every agent we are here; declare lost an agent we have not heard from."""
        for agent in self.agents:
            channel = agent.channel
            if channel is None or agent.finished:
                continue
            silent = now - channel.last_received
            if silent > self.settings.heartbeat_timeout:
                self._agent_gone(
                    agent,
                    f"it stopped answering: nothing heard from it for {silent:.1f} s "
                    "(host down, or the network to it cut?)",
                )
            elif now - channel.last_sent >= HEARTBEAT_S:
                self._send(agent, Beat())

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

    def _agent_ready(self, agent: _Agent, ready: Ready) -> None:
        agent.ready = ready
        if self.phase is Phase.STARTING and all(a.ready is not None for a in self.agents):
            self._phase_done("agents ready")
            self._start_workers()

    def _start_workers(self) -> None:
        readies = [a.ready for a in self.agents if a.ready is not None]
        reports = [plan.HostReport(a.hostname, r.gpus, r.cpus) for a, r in zip(self.agents, readies, strict=True)]
        hostnames = [a.hostname for a in self.agents]
        plan.check_backend(self.settings.backend, hostnames, reports)
        counts = plan.worker_counts(self.settings.workers_per_host, reports)
        self.pipeline.open(RunInfo(self.start_time, hostnames, counts))
        self._pipeline_open = True
        agent0 = self.agents[0]
        host0_is_local = plan.is_loopback(agent0.launcher_address)
        rendezvous = plan.rendezvous_addresses(
            [a.launcher_address for a in self.agents], agent0.peer_address, host0_is_local, readies[0].port
        )
        workers = plan.plan_workers(counts, rendezvous, self.settings.worker)
        self.placement = plan.placement(hostnames, counts)
        self.phase = Phase.RUNNING
        for agent, specs in zip(self.agents, workers, strict=True):
            agent.ranks = [spec.rank for spec in specs]
            self._send(agent, StartWorkers(specs), *self.payload)
        self._phase_done("workers started")

    # -- events from agents -----------------------------------------------------------
    def _from_agent(self, agent: _Agent) -> None:
        assert agent.channel is not None
        try:
            message, blob = agent.channel.recv()
        except ChannelClosed:
            self._agent_gone(agent, "its connection to the launcher closed")
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
            case AgentStopped(reason):
                self._agent_gone(agent, reason, explained=bool(reason))

    def _emit(self, agent: _Agent, lines: Sequence[tuple[float, int | None, str, int, str, str]]) -> None:
        for created, local_rank, stream, level, text, logger in lines:
            rank = agent.ranks[local_rank] if local_rank is not None and local_rank < len(agent.ranks) else None
            self.pipeline.emit(LogRecord(created, agent.hostname, local_rank, rank, stream, level, text, logger))

    def _worker_raised(self, agent: _Agent, raised: WorkerRaised, blob: bytearray) -> None:
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
        self.stalled[rank] = (hostname, seconds, where)
        if self.hang_at is None and self.phase is Phase.RUNNING:
            # Have every worker write its stack to its log and say how long it has been stuck,
            # so that the error names every stuck rank, not only the first to notice.
            for other in self.agents:
                if other.channel is not None and not other.finished:
                    self._send(other, DumpStacks())
            self.hang_at = time.monotonic() + _HANG_GATHER_S

    def _worker_exited(self, agent: _Agent, local_rank: int, how: str) -> None:
        rank = agent.ranks[local_rank]
        if rank in self.exits:
            return
        self.exits[rank] = how
        if rank not in self.results:
            error = WorkerFailedError(agent.hostname, local_rank, rank, how)
            self._fail(error, str(error))

    def _agent_process_ended(self, agent: _Agent) -> None:
        assert agent.process is not None
        self.selector.unregister(agent.process.fileno())
        if agent.channel is not None:
            return  # its connection tells the rest (and may still hold unread output)
        self._agent_gone(agent, agent.process.poll() or "it exited")

    def _agent_gone(self, agent: _Agent, reason: str, explained: bool = False) -> None:
        """The agent's connection is gone; unless we asked for that, the run fails, saying
        why: as the agent explained it, else as its executor saw it end, else `reason`."""
        if agent.channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(agent.channel.sock)
            agent.channel.close()
            agent.channel = None
        if not agent.finished and self.phase is not Phase.STOPPING:
            if agent.process is not None and not explained:
                time.sleep(0.05)  # let the executor see the exit status, for a better message
                reason = agent.process.poll() or reason
            error = AgentFailedError(agent.hostname, reason or "it exited")
            self._fail(error, str(error))
        agent.finished = True

    # -- signals ----------------------------------------------------------------------
    def _catch_signals(self) -> None:
        """Catch the forwarded signals until `close()` (main thread only: Python runs signal
        handlers there, and `signal.signal` refuses any other thread)."""
        if threading.current_thread() is not threading.main_thread() or self._signal_pipe is not None:
            return
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self._signal_pipe = (read_end, write_end)
        self.selector.register(read_end, selectors.EVENT_READ, ("signal", None))

        def note(signum: int, frame: object) -> None:
            # Only the self-pipe trick here: the selector loop does the work.
            with contextlib.suppress(OSError):
                os.write(write_end, bytes((signum,)))

        for signum in FORWARDED_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, note)

    def _read_signals(self) -> list[int]:
        if self._signal_pipe is None:
            return []
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._signal_pipe[0], 256):
                data += chunk
        return list(data)

    def _on_signals(self) -> None:
        for signum in self._read_signals():
            if not self.signals and (self.failures or self.phase in (Phase.STOPPING, Phase.DONE)):
                # The outcome is known already: nothing to interrupt. The program's own handler
                # (by default: the end of the process) gets the signal once the run is cleaned up.
                self._redeliver.append(signum)
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

    def _raise_if_interrupted(self) -> None:
        if not self.signals:
            return
        names = [processes.signal_name(s) for s in self.signals]
        cause = combine_failures(self.failures) if self.failures else None
        if not self.forwarded:
            raise RunInterrupted(names, "the agents were still starting; the run was stopped at once") from cause
        ranks = len(self.placement)
        running = [rank for rank in range(ranks) if rank not in self.exits]  # stopped by us, or lost
        results = None
        if ranks and len(self.results) == ranks:
            with contextlib.suppress(Exception):  # then the cause says what went wrong
                results = LaunchResult({r: _pickling.loads(b) for r, b in self.results.items()}, self.placement)
        grace = f"signal_grace={self.settings.signal_grace:g} s"
        if running:
            plural = "s" * (len(running) > 1)
            how = f"the run was stopped after {grace}, with rank{plural} {', '.join(map(str, running))} still running"
        else:
            how = f"every worker ended within {grace}"
        endings: dict[str, int] = {}
        for rank in range(ranks):
            if rank in self.results:
                ending = "returned"
            elif rank in self.exits:
                ending = self.exits[rank]
            else:
                continue
            endings[ending] = endings.get(ending, 0) + 1
        summary = ", ".join(f"{count} {ending}" for ending, count in endings.items())
        detail = f"it was sent on to every worker, and {how}" + (f" ({summary})" if summary else "")
        raise RunInterrupted(names, detail, results) from cause

    def _release_signals(self) -> None:
        """Give the signals back to the program's handlers; deliver again what arrived once
        the outcome was known, and what arrived after the run was followed."""
        if self._signal_pipe is None:
            return
        late = self._redeliver + self._read_signals()
        for signum, previous in self._previous_handlers.items():
            # None: a handler set outside Python, which cannot be put back; the default is the nearest
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()
        for fd in self._signal_pipe:
            os.close(fd)
        self._signal_pipe = None
        for signum in dict.fromkeys(late):
            signal.raise_signal(signum)

    # -- stopping ---------------------------------------------------------------------
    def _fail(self, exception: BaseException, summary: str) -> None:
        self.failures.append(Failure(exception, summary))
        if self.stop_at is None:
            # Ranks hitting the same bug raise within moments of each other: gather them
            # briefly so that one error reports them all. A death needs no such wait.
            raised = not isinstance(exception, (WorkerFailedError, AgentFailedError))
            self.stop_at = time.monotonic() + (_GATHER_S if raised else 0.0)

    def _stop_all(self) -> None:
        if self.phase in (Phase.STOPPING, Phase.DONE):
            return
        self.phase = Phase.STOPPING
        self.deadline = time.monotonic() + _STOP_GRACE_S
        for agent in self.agents:
            if agent.channel is None:
                agent.finished = True  # not connected (any more): the executor stops it in close()
            else:
                self._send(agent, Stop())

    def _send(self, agent: _Agent, message: object, *blob: memoryview) -> None:
        assert agent.channel is not None
        try:
            agent.channel.send(message, *blob)  # type: ignore[arg-type]
        except ChannelClosed:
            self._agent_gone(agent, "its connection to the launcher closed")


_T = TypeVar("_T")
_R = TypeVar("_R")


def _each(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[tuple[_R | None, str]]:
    """`fn` on every item, in parallel when there are several (each may wait on a network):
    per item, its outcome or the error it raised."""

    def capture(item: _T) -> tuple[_R | None, str]:
        try:
            return fn(item), ""
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"

    if len(items) <= 1:
        return [capture(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), 64)) as pool:
        return list(pool.map(capture, items))
