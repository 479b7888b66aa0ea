"""The launcher side of a run: start one agent per host, follow them, end in a result or an error.

A `Supervisor` goes through explicit phases (`Phase`): STARTING (agents started, waiting for
each to say hello), RUNNING (workers started, results and failures arriving), STOPPING (every
agent asked to stop, waiting for them to go) and DONE. Use it as a context manager::

    with Supervisor(...) as supervisor:
        supervisor.start()
        results = supervisor.run(payload, pipeline)

A supervisor that keeps its agents (a warm session, ``keep_agents=True``) runs many times: at
the end of each run its agents kill that run's workers and wait (ENDING, then IDLE), and the
next `run()` starts workers at once. Between runs, `serve_idle()` (in a thread of the session)
keeps the heartbeats going. An agent lost at any point makes the supervisor `lost`: it cannot
run again, and its session replaces it.

`close()` (also on leaving the ``with`` block) stops every agent and releases every socket,
whatever the phase. Only one thread at a time may call `run()`, `wait_ready()` or `serve_idle()`:
each runs the one selector loop in the caller's thread.

Signals: during a run, in the main thread only (where Python runs signal handlers), SIGTERM,
SIGUSR1 and SIGUSR2 sent to this process are caught. One that arrives while workers run is sent
on to every worker (`Signal`), and the run is stopped when they have all ended or after
`RunSettings.signal_grace` seconds, raising `RunInterrupted`; before the workers start, it stops
the run at once. One that arrives once the run's outcome is known (every rank ended, or a
failure is being reported) is delivered again at the end of the run, to the handler the program
had before. SIGINT is left alone by a one-shot run: Ctrl-C raises KeyboardInterrupt, and
`close()` stops everything. In a warm session it is caught: the run's workers are stopped, the
agents kept, and then KeyboardInterrupt is raised.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import threading
import time
from collections.abc import Callable, Sequence
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
from .logs import LogPipeline, LogRecord
from .outcome import decode_results, interruption
from .protocol import (
    Beat,
    EndRun,
    Stop,
)
from .results import LaunchResult

__all__ = ["Phase", "RunSettings", "Supervisor"]

_STOP_GRACE_S = 3.0
_END_GRACE_S = 10.0  # for agents to end a run of a session: kill its workers, start a store
_GATHER_S = 0.05
_HANG_GATHER_S = 1.0


class Supervisor(RunEvents):
    """Runs on a set of hosts, from starting their agents to each run's result. Owns every agent,
    socket and each run's log pipeline while it runs."""

    def __init__(
        self,
        settings: RunSettings,
        hostnames: Sequence[str],
        launcher_addresses: Sequence[str],
        executor: NodeExecutor,
        *,
        keep_agents: bool = False,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.keep_agents = keep_agents
        self.phase = Phase.NEW
        self.lost = ""  # why this supervisor's agents cannot serve another run ("": they can)
        self.secret = secrets.token_bytes(32)
        self.agents = [AgentHandle(i, h, a) for i, (h, a) in enumerate(zip(hostnames, launcher_addresses, strict=True))]
        self.selector = selectors.DefaultSelector()
        self.gate: AgentGate | None = None
        self.deadline = 0.0  # of the current phase: agents started / agents gone / run ended
        self.began = 0.0  # time.monotonic() at the start of the current run
        self.signal_catcher = SignalCatcher()
        self._wake_r, self._wake_w = os.pipe()  # wakes `serve_idle` when the next run comes
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._early: list[LogRecord] = []  # emitted while no run's pipeline was open
        self._beats_done = threading.Event()
        self._beats: threading.Thread | None = None
        self.debug = DebugConsole(self)  # breakpoints, post-mortem and stacks of each run
        self._new_record([], None, settings.worker)

    def _new_record(
        self,
        payload: list[memoryview],
        pipeline: LogPipeline | None,
        worker: plan.WorkerSettings,
        keep_timing: bool = False,
    ) -> None:
        """Forget the previous run: its results, exits, failures, stalls, signals and timings
        (`keep_timing`: not the timings, when the run includes the agents' start)."""
        self.payload = payload
        self.pipeline = pipeline  # type: ignore[assignment]  # None between runs
        self.worker = worker
        self._pipeline_open = False
        self.start_time = datetime.now()
        self.placement: list[tuple[str, int]] = []  # rank -> (hostname, local rank)
        self.results: dict[int, bytearray] = {}
        self.exits: dict[int, str] = {}
        self.failures: list[Failure] = []
        self.stalled: dict[int, tuple[str, float, str]] = {}  # rank -> (host, seconds, where)
        self.stop_at: float | None = None  # when to stop all agents, once something failed
        self.hang_at: float | None = None  # when to fail the run as hung
        self.signals: list[int] = []  # received while the run was in progress, in order
        self.forwarded = False  # whether it was sent on to the workers
        self.interrupted = False
        if not keep_timing:
            self.phases: dict[str, float] = {}  # phase -> seconds from `began` to its end
        self.workers_started = 0  # ranks that reported their process group formed
        for agent in self.agents:
            agent.ranks = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Open the gate and start every agent (in parallel); raise if one cannot be started."""
        self.signal_catcher.catch(self.selector)
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
        self._beats = threading.Thread(target=self._beat_while_busy, name="torchrunx-heartbeat", daemon=True)
        self._beats.start()
        errors = []
        for agent, (process, error) in zip(self.agents, outcomes, strict=True):
            if process is not None:
                agent.process = process
                agent.started_at = time.monotonic()
                self.selector.register(process.fileno(), selectors.EVENT_READ, ("process", agent))
            else:
                errors.append(AgentFailedError(agent.hostname, f"could not start the agent: {error}"))
        if errors:
            self.lost = str(errors[0])
            for e in errors[1:]:
                add_note(errors[0], f"also: {e}")
            raise errors[0]

    def wait_ready(self) -> None:
        """Follow the agents until every one is ready for a run (IDLE); raise if one cannot be."""
        try:
            self._loop_until(lambda: self.phase is not Phase.STARTING)
            self._raise_if_cut_short()
        finally:
            self.signal_catcher.release()

    def run(
        self, payload: list[memoryview], pipeline: LogPipeline, worker: plan.WorkerSettings | None = None
    ) -> LaunchResult:
        """Run the function of `payload` on fresh workers (at once if the agents are idle, else as
        soon as they are ready), follow the run to its end, and return its results or raise."""
        self._new_record(payload, pipeline, worker or self.settings.worker, keep_timing=self.phase is Phase.STARTING)
        self.signal_catcher.catch(self.selector, interrupt=self.keep_agents)
        self.debug.open()
        try:
            if self.phase is Phase.IDLE:
                self.began = time.monotonic()
                self._start_workers()
            self._loop_until(lambda: self.phase in (Phase.IDLE, Phase.DONE))
        except BaseException as e:
            if self.keep_agents and self.phase is not Phase.IDLE:
                self.lost = self.lost or f"a run was cut short by {type(e).__name__}"
            raise
        finally:
            self.debug.close()
            self._close_pipeline()
            if self.keep_agents:
                self.signal_catcher.release()
        self._raise_if_cut_short()
        self._phase_done("returned")
        return decode_results(self.results, self.placement, self.phases)

    def serve_idle(self, stop: threading.Event) -> None:
        """Between the runs of a session (from a thread of its own): heartbeats both ways, and a
        lost agent noticed. Returns once `stop` is set (then call `wake()`) or an agent is lost."""
        while not stop.is_set() and not self.lost and self.phase is Phase.IDLE:
            self._poll()

    def wake(self) -> None:
        """Make `serve_idle` look at its stop event now."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """Stop every agent and release every socket. Safe to call at any point."""
        self._beats_done.set()
        if self._beats is not None:
            self._beats.join()
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
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._close_pipeline()
                self.phase = Phase.DONE
            finally:
                self.signal_catcher.release()

    def _close_pipeline(self) -> None:
        if self._pipeline_open:
            self._pipeline_open = False
            self.pipeline.close()

    def _raise_if_cut_short(self) -> None:
        """Raise what ended the run early: a signal, a failure, or Ctrl-C (in a session)."""
        if self.signals:
            raise self._interruption()
        if self.failures:
            raise combine_failures(self.failures)
        if self.interrupted:
            raise KeyboardInterrupt

    def _interruption(self) -> BaseException:
        return interruption(
            self.signals,
            self.forwarded,
            self.failures,
            self.placement,
            self.results,
            self.exits,
            self.settings.signal_grace,
        )

    # -- the loop ---------------------------------------------------------------------
    def _loop_until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._poll()

    def _poll(self) -> None:
        """Wait for events (at most until the most pressing deadline), handle them, then check the time."""
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
            elif kind == "wake":
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            elif self.gate is not None and self.gate.owns(key.data):
                arrival = self.gate.on_ready(key)
                if arrival is not None:
                    self._welcome(arrival)
        self._tick(time.monotonic())

    def _emit_record(self, record: LogRecord) -> None:
        if self._pipeline_open:
            self.pipeline.emit(record)
        elif len(self._early) < 10_000:  # e.g. an agent that is ready before the others: kept for the run's log
            self._early.append(record)

    def _open_pipeline(self, info: object) -> None:
        self.pipeline.open(info)  # type: ignore[arg-type]
        self._pipeline_open = True
        early, self._early = self._early, []
        for record in early:
            self.pipeline.emit(record)

    def _beat_while_busy(self) -> None:
        """(A thread of its own.) Every agent hears from us at least once a heartbeat interval,
        even while this supervisor's loop is busy, e.g. reading a big result over a slow link:
        otherwise the other agents would take us for gone."""
        processes.leave_signals_to_the_main_thread()
        while not self._beats_done.wait(HEARTBEAT_S / 4):
            for agent in self.agents:
                channel = agent.channel
                if channel is not None and not agent.finished:
                    channel.beat_if_quiet(Beat())

    # -- time -------------------------------------------------------------------------
    def _next_timeout(self) -> float:
        """Until the most pressing deadline; at most one heartbeat interval."""
        pressing = [t for t in (self.stop_at, self.hang_at) if t is not None]
        if self.phase in (Phase.STARTING, Phase.STOPPING, Phase.ENDING):
            pressing.append(self.deadline)
        if not pressing:
            return HEARTBEAT_S
        return max(0.0, min(min(pressing) - time.monotonic(), HEARTBEAT_S))

    def _tick(self, now: float) -> None:
        if self.gate is not None:
            self.gate.expire(now)
        self._heartbeat(now)
        if self.phase is Phase.IDLE:
            return
        if self.phase is Phase.STOPPING:
            if now > self.deadline or all(a.finished for a in self.agents):
                self.phase = Phase.DONE
            return
        if self.phase is Phase.ENDING:
            if all(a.idle or a.finished for a in self.agents):
                self.phase = Phase.IDLE
            elif now > self.deadline:
                slow = [a.hostname for a in self.agents if not (a.idle or a.finished)]
                self.lost = f"the agent on {slow[0]!r} did not end the run within {_END_GRACE_S:g} s"
                self.phase = Phase.IDLE
            return
        if self.hang_at is not None and now >= self.hang_at:
            self.hang_at = None
            bound = self.worker.hang_timeout or 0
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
            if silent > self.settings.heartbeat_timeout and not channel.has_unread():
                self._agent_gone(
                    agent,
                    f"it stopped answering: nothing heard from it for {silent:.1f} s "
                    "(host down, or the network to it cut?)",
                )
            elif now - channel.last_sent >= HEARTBEAT_S:
                self._send(agent, Beat())

    # -- stopping ---------------------------------------------------------------------
    def _stop_all(self) -> None:
        """End the run: a session's agents (if all are still there) kill its workers and stay;
        otherwise every agent is stopped."""
        if self.phase in (Phase.STOPPING, Phase.DONE, Phase.ENDING, Phase.IDLE):
            return
        if self.keep_agents and self.phase is Phase.RUNNING and not self.lost:
            self.phase = Phase.ENDING
            self.deadline = time.monotonic() + _END_GRACE_S
            for agent in self.agents:
                agent.idle = False
                if agent.channel is not None and not agent.finished:
                    self._send(agent, EndRun())
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
        except ChannelClosed as e:
            self._agent_gone(agent, f"its connection to the launcher {e.how()}")
