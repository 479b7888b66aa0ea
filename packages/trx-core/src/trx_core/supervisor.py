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
import os
import secrets
import selectors
import time
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType

from . import plan, processes
from ._debug_console import DebugConsole
from ._parallel import each
from ._run_events import AgentHandle, Phase, RunEvents, RunSettings
from ._signals import SignalCatcher
from .channel import HEARTBEAT_S, ChannelClosed
from .errors import (
    AgentFailedError,
    Failure,
    WorkerHungError,
    add_note,
    combine_failures,
)
from .executor import AgentProcess, AgentSpec, NodeExecutor
from .gate import AgentGate
from .logs import LogPipeline
from .outcome import decode_results, interruption
from .protocol import (
    Beat,
    Stop,
)
from .results import LaunchResult

__all__ = ["Phase", "RunSettings", "Supervisor"]

_STOP_GRACE_S = 3.0
_GATHER_S = 0.05
_HANG_GATHER_S = 1.0


class Supervisor(RunEvents):
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
        self.agents = [AgentHandle(i, h, a) for i, (h, a) in enumerate(zip(hostnames, launcher_addresses, strict=True))]
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
        self.signal_catcher = SignalCatcher()
        self.debug = DebugConsole(self)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Open the gate and start every agent (in parallel); raise if one cannot be started."""
        self.signal_catcher.catch(self.selector)
        self.debug.open()
        self.began = time.monotonic()
        loopback = all(plan.is_loopback(a.launcher_address) for a in self.agents)
        self.gate = AgentGate(self.selector, "127.0.0.1" if loopback else "", self.secret)
        store = plan.store_bind_address([a.launcher_address for a in self.agents])
        self.phase = Phase.STARTING
        self.deadline = time.monotonic() + self.settings.timeout

        def start(agent: AgentHandle) -> AgentProcess:
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

        outcomes = each(start, self.agents)
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
                elif kind == "debug":
                    self.debug.on_ready(agent)
                elif self.gate is not None and self.gate.owns(key.data):
                    arrival = self.gate.on_ready(key)
                    if arrival is not None:
                        self._welcome(arrival)
            self._tick(time.monotonic())
        if self.signals:
            raise interruption(
                self.signals,
                self.forwarded,
                self.failures,
                self.placement,
                self.results,
                self.exits,
                self.settings.signal_grace,
            )
        if self.failures:
            raise combine_failures(self.failures)
        self._phase_done("returned")
        return decode_results(self.results, self.placement, self.phases)

    def close(self) -> None:
        """Stop every agent and release every socket of the run. Safe to call at any point."""
        try:
            for agent in self.agents:
                if agent.channel is not None and not agent.finished:
                    with contextlib.suppress(ChannelClosed):
                        agent.channel.send(Stop())
            each(lambda process: process.stop(), [a.process for a in self.agents if a.process is not None])
            for agent in self.agents:
                if agent.channel is not None:
                    agent.channel.close()
        finally:
            try:
                self.debug.close()
                if self.gate is not None:
                    self.gate.close()
                self.selector.close()
                if self._pipeline_open:
                    self._pipeline_open = False
                    self.pipeline.close()
                self.phase = Phase.DONE
            finally:
                self.signal_catcher.release()

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

    # -- stopping ---------------------------------------------------------------------
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

    def _send(self, agent: AgentHandle, message: object, *blob: memoryview) -> None:
        assert agent.channel is not None
        try:
            agent.channel.send(message, *blob)  # type: ignore[arg-type]
        except ChannelClosed:
            self._agent_gone(agent, "its connection to the launcher closed")
