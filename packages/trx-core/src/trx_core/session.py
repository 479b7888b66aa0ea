"""Warm sessions: a launcher's agents kept between runs, so that a run costs a fork, not a start.

``with Launcher(...) as launcher:`` (or `Launcher.start` / `Launcher.close`) gives the launcher
a `Session`. Its agents start once and import torch once; every `run()` inside forks fresh
workers from them, with a fresh rendezvous store and process group, and at its end the agents
kill what is left of that run (workers, their children, the store) and wait for the next one.

- Runs of one session are serialised: a second thread calling `run()` waits for the first.
- Between runs a thread of the session keeps the heartbeats going, so idle agents still stop by
  themselves when the launcher is gone, and the launcher notices a lost agent.
- A run that fails (a worker raised or died) fails alone. When an agent is lost (during a run:
  that run raises `AgentFailedError`; between runs: nothing to fail), the session's agents are
  stopped, and the next `run()` starts them all again, with a `RuntimeWarning` saying why.
- Ctrl-C during a run (main thread) stops that run's workers and raises KeyboardInterrupt; the
  agents stay, ready for the next run.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import processes
from .errors import ConfigurationError
from .results import LaunchResult
from .run import new_pipeline, new_supervisor, pickle_payload, worker_settings
from .supervisor import Supervisor

if TYPE_CHECKING:
    from .launcher import Launcher

__all__ = ["Session"]


class Session:
    """A launcher's warm agents, from `start()` to `close()`."""

    def __init__(self, launcher: Launcher) -> None:
        self._launcher = launcher
        self._fields = _fields(launcher)
        self._env = launcher.matched_env()  # what the agents were started with
        self._lock = threading.Lock()  # one run at a time, and no run during close()
        self._supervisor: Supervisor | None = None
        self._idle_thread: threading.Thread | None = None
        self._stop_idle = threading.Event()
        self._lost = ""  # why the agents were stopped (the next run starts them again)
        self.closed = False

    def start(self) -> None:
        """Start every host's agent and wait until all are ready; raise (stopping them) if one cannot be."""
        supervisor = new_supervisor(self._launcher, keep_agents=True)
        try:
            supervisor.start()
            supervisor.wait_ready()
        except BaseException:
            supervisor.close()
            raise
        self._supervisor = supervisor
        atexit.register(self.close)
        self._resume_idle()

    def run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> LaunchResult:
        """Run `func` on fresh workers forked from the session's agents."""
        self._check_unchanged()
        payload = pickle_payload(func, args, kwargs)
        with self._lock:
            if self.closed:
                raise ConfigurationError("this launcher's session was closed while the run waited for its turn")
            self._pause_idle()
            try:
                self._drop_if_lost()  # lost while idle
                supervisor = self._supervisor
                if supervisor is None:  # lost earlier: this run starts the agents again, as a cold run does
                    message = f"torchrunx: starting this session's agents again, since {self._lost}"
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                    self._env = self._launcher.matched_env()
                    supervisor = self._supervisor = new_supervisor(self._launcher, keep_agents=True)
                    supervisor.start()
                pipeline = new_pipeline(self._launcher)
                return supervisor.run(payload, pipeline, worker_settings(self._launcher, started_env=self._env))
            finally:
                self._drop_if_lost()
                if self._supervisor is not None:
                    self._resume_idle()

    def close(self) -> None:
        """Stop every agent of the session. Waits for a run in progress (in another thread) to end."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            atexit.unregister(self.close)
            self._pause_idle()
            if self._supervisor is not None:
                self._supervisor.close()
                self._supervisor = None

    # -- between runs -----------------------------------------------------------------
    def _drop_if_lost(self) -> None:
        """Stop the agents of a supervisor that lost one (the next run starts them all again)."""
        supervisor = self._supervisor
        if supervisor is not None and supervisor.lost:
            self._lost, self._supervisor = supervisor.lost, None
            supervisor.close()

    def _resume_idle(self) -> None:
        supervisor = self._supervisor
        assert supervisor is not None and self._idle_thread is None

        def serve() -> None:
            processes.leave_signals_to_the_main_thread()  # the program's own handlers run there, at once
            with contextlib.suppress(Exception):  # whatever broke shows at the next run, as `lost`
                supervisor.serve_idle(self._stop_idle)
            if not supervisor.lost and not self._stop_idle.is_set():
                supervisor.lost = "the session's idle loop ended unexpectedly"

        self._stop_idle.clear()
        self._idle_thread = threading.Thread(target=serve, name="torchrunx-session-idle", daemon=True)
        self._idle_thread.start()

    def _pause_idle(self) -> None:
        thread, self._idle_thread = self._idle_thread, None
        if thread is None:
            return
        self._stop_idle.set()
        if self._supervisor is not None:
            self._supervisor.wake()
        thread.join()

    def _check_unchanged(self) -> None:
        changed = [name for name, value in _fields(self._launcher).items() if self._fields[name] != value]
        if changed:
            raise ConfigurationError(
                f"Launcher field(s) {', '.join(changed)} changed while its session is open: the agents run with "
                "the values of start(). Close the session (leave the `with` block) and start a new one, or use "
                "another Launcher."
            )


def _fields(launcher: Launcher) -> dict[str, Any]:
    return {f.name: copy.deepcopy(getattr(launcher, f.name)) for f in dataclasses.fields(launcher) if f.init}
