"""One launch, from a validated `Launcher` to a `LaunchResult` (or an exception).

The launcher side of the protocol lives here: it starts one agent per host through the
executor, accepts their authenticated connections, hands them the payload, and then
follows every agent's events in one selector loop until all ranks have returned or one
has failed. `_Run` owns every socket and agent it opens and closes them in `close()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import _pickling
from .channel import HEARTBEAT_S, AuthenticationFailed, Channel, ChannelClosed, send_challenge, verify_answer
from .errors import (
    AgentFailedError,
    ConfigurationError,
    WorkerError,
    WorkerFailedError,
    WorkerHungError,
    attach_remote_traceback,
)
from .executor import AgentProcess, AgentSpec, NodeExecutor, resolve_executor
from .logs import LogPipeline, LogRecord, RunInfo, resolve_log_pipeline
from .results import LaunchResult
from .worker import WorkerLaunch

if TYPE_CHECKING:
    from .launcher import Launcher

_STOP_GRACE_S = 3.0
_HANDSHAKE_TIMEOUT_S = 2.0
_GATHER_S = 0.05
_HANG_GATHER_S = 1.0


def execute(
    launcher: Launcher, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> LaunchResult:
    """Run `func` as `launcher` says. `launcher` must have been validated."""
    payload = _pickle_payload(func, args, kwargs)
    hostnames = resolve_hostnames(launcher)
    launcher = with_discovered_workers_per_host(launcher, hostnames)
    executor = resolve_executor(launcher.executor, launcher)
    pipeline = resolve_log_pipeline(launcher)
    run = _Run(launcher, executor, pipeline, hostnames, payload)
    try:
        return run.execute()
    finally:
        run.close()


def _pickle_payload(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[memoryview]:
    if not callable(func):
        raise ConfigurationError(f"func must be callable, got {type(func).__qualname__}")
    try:
        return _pickling.dumps((func, args, kwargs))
    except Exception as e:
        raise ConfigurationError(
            f"cannot send {getattr(func, '__qualname__', func)!r} and its arguments to the workers, "
            f"they must be picklable (by cloudpickle): {type(e).__name__}: {e}"
        ) from e


def resolve_hostnames(launcher: Launcher) -> list[str]:
    """The hosts of a run: the given list, or discovered for ``auto`` / ``slurm``."""
    if not isinstance(launcher.hostnames, str):
        return list(launcher.hostnames)
    from importlib.metadata import entry_points

    in_slurm = "SLURM_JOB_NODELIST" in os.environ
    if launcher.hostnames == "auto" and not in_slurm:
        return ["localhost"]
    for ep in entry_points(group="torchrunx.host_discovery"):
        if ep.name == "slurm":
            discovered: list[str] = ep.load()()
            return discovered
    raise ConfigurationError(
        "hostnames='slurm' needs SLURM discovery, which trx-remote provides: pip install torchrunx"
        if in_slurm
        else "hostnames='slurm' but this process is not inside a SLURM allocation (no SLURM_JOB_NODELIST)"
    )


def with_discovered_workers_per_host(launcher: Launcher, hostnames: list[str]) -> Launcher:
    """`launcher`, with ``workers_per_host="auto"`` made what SLURM allotted to each host when
    the hosts themselves came from SLURM (through the ``torchrunx.workers_discovery`` entry point)."""
    if launcher.workers_per_host != "auto" or not isinstance(launcher.hostnames, str):
        return launcher
    if "SLURM_JOB_NODELIST" not in os.environ:
        return launcher
    from dataclasses import replace
    from importlib.metadata import entry_points

    for ep in entry_points(group="torchrunx.workers_discovery"):
        if ep.name == "slurm":
            counts: list[int] | None = ep.load()()
            if counts and len(counts) == len(hostnames):
                return replace(launcher, workers_per_host=counts)
    return launcher


@dataclass
class _Agent:
    index: int
    hostname: str
    process: AgentProcess | None = None
    channel: Channel | None = None
    hello: tuple[Any, ...] | None = None
    peer_address: str = ""
    ranks: list[int] = field(default_factory=list)
    finished: bool = False  # said "stopped" or closed after we asked it to stop


@dataclass
class _Failure:
    exception: BaseException
    summary: str


class _Run:
    def __init__(
        self,
        launcher: Launcher,
        executor: NodeExecutor,
        pipeline: LogPipeline,
        hostnames: list[str],
        payload: list[memoryview],
    ) -> None:
        self.launcher = launcher
        self.executor = executor
        self.pipeline = pipeline
        self.payload = payload
        self.start = datetime.now()
        self.secret = secrets.token_bytes(32)
        self.run_id = f"{self.start:%Y%m%d%H%M%S}-{secrets.token_hex(4)}"
        self.agents = [_Agent(i, h) for i, h in enumerate(hostnames)]
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.store: Any = None
        self.placement: list[tuple[str, int]] = []  # rank -> (hostname, local rank)
        self.results: dict[int, bytearray] = {}
        self.exits: dict[int, str] = {}
        self.failures: list[_Failure] = []
        self.stopping = False
        self.stop_at: float | None = None  # when to stop all agents, once something failed
        self.stop_deadline = 0.0
        self.start_deadline = 0.0
        self.pipeline_open = False
        self.stalled: dict[int, tuple[str, float, str]] = {}  # rank -> (host, seconds, where)
        self.hang_at: float | None = None  # when to fail the run as hung

    # -- the run ----------------------------------------------------------------------
    def execute(self) -> LaunchResult:
        addresses = {a.hostname: self._launcher_address(a.hostname) for a in self.agents}
        bind_host = "127.0.0.1" if all(_is_loopback(x) for x in addresses.values()) else ""
        self.listener = socket.create_server((bind_host, 0), backlog=len(self.agents) + 8)
        self.selector.register(self.listener, selectors.EVENT_READ, ("listener", None))
        port = self.listener.getsockname()[1]
        if self.launcher.backend is not None:
            self.store = _start_store(bind_host or "0.0.0.0", self.launcher.timeout)
        self._start_agents(addresses, port)
        self.start_deadline = time.monotonic() + self.launcher.timeout
        while not self._done():
            for key, _ in self.selector.select(self._next_timeout()):
                if self.selector.get_map().get(key.fileobj) is not key:
                    continue  # closed while an earlier event of this batch was handled
                kind, agent = key.data
                if kind == "listener":
                    self._accept()
                elif kind == "pending":
                    self._authenticate(key.fileobj, agent)  # type: ignore[arg-type]
                elif kind == "authenticated":
                    self._hello(key.fileobj)  # type: ignore[arg-type]
                elif kind == "agent":
                    self._from_agent(agent)
                elif kind == "process":
                    self._agent_process_ended(agent)
            now = time.monotonic()
            self._heartbeat(now)
            if self.stopping and now > self.stop_deadline:
                break
            if self.hang_at is not None and now >= self.hang_at and not self.stopping:
                self.hang_at = None
                bound = self.launcher.hang_timeout or 0
                stuck = {rank: state for rank, state in self.stalled.items() if state[1] >= bound / 2}
                error = WorkerHungError(stuck, bound)
                self._fail(error, str(error).splitlines()[0])
            if self.stop_at is not None and now >= self.stop_at:
                self._stop_all()
            if not (self.stopping or self._all_started()) and now > self.start_deadline:
                missing = [a.hostname for a in self.agents if a.hello is None]
                self._fail(AgentFailedError(missing[0], f"did not connect within {self.launcher.timeout} s"), "")
                self._stop_all()
        if self.failures:
            raise _combined(self.failures)
        return self._result()

    def _launcher_address(self, hostname: str) -> str:
        return self.launcher.launcher_address or self.executor.launcher_address(hostname)

    def _next_timeout(self) -> float:
        """Until the next deadline, the most pressing first; at most one heartbeat interval."""
        if self.stopping:
            deadline: float | None = self.stop_deadline
        elif self.stop_at is not None or self.hang_at is not None:
            deadline = self.stop_at if self.stop_at is not None else self.hang_at
        else:
            deadline = None if self._all_started() else self.start_deadline
        if deadline is None:
            return HEARTBEAT_S
        return max(0.0, min(deadline - time.monotonic(), HEARTBEAT_S))

    def _heartbeat(self, now: float) -> None:
        """Tell every agent we are here; declare lost an agent we have not heard from."""
        for agent in self.agents:
            channel = agent.channel
            if channel is None or agent.finished:
                continue
            silent = now - channel.last_received
            if silent > self.launcher.heartbeat_timeout:
                self._agent_gone(
                    agent,
                    f"it stopped answering: nothing heard from it for {silent:.1f} s "
                    "(host down, or the network to it cut?)",
                )
            elif now - channel.last_sent >= HEARTBEAT_S:
                try:
                    channel.send(("beat",))
                except ChannelClosed:
                    self._agent_gone(agent, "its connection to the launcher closed")

    def _done(self) -> bool:
        if self.stopping:
            return all(a.finished for a in self.agents)
        if self.placement and len(self.exits) == len(self.placement):
            self._stop_all()
            return all(a.finished for a in self.agents)
        return False

    def _all_started(self) -> bool:
        return all(a.hello is not None for a in self.agents)

    def _start_agents(self, addresses: dict[str, str], port: int) -> None:
        env = self.launcher.matched_env()
        env["TORCHRUNX_RUN_ID"] = self.run_id
        env_file = str(self.launcher.env_file) if self.launcher.env_file is not None else None

        def start(agent: _Agent) -> AgentProcess:
            address = addresses[agent.hostname]
            host = f"[{address}]" if ":" in address else address
            spec = AgentSpec(
                hostname=agent.hostname,
                python=sys.executable,
                args=(
                    *("-m", "trx_core.agent", "--launcher", f"{host}:{port}", "--host-index", str(agent.index)),
                    *("--heartbeat-timeout", str(self.launcher.heartbeat_timeout)),
                ),
                cwd=os.getcwd(),
                env=env,
                env_file=env_file,
                stdin=self.secret.hex().encode() + b"\n",
            )
            return self.executor.start(spec)

        if len(self.agents) == 1:
            outcomes = [_capture(start, self.agents[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(self.agents), 64)) as pool:
                outcomes = list(pool.map(lambda a: _capture(start, a), self.agents))
        errors = []
        for agent, (process, error) in zip(self.agents, outcomes, strict=False):
            if process is not None:
                agent.process = process
                self.selector.register(process.fileno(), selectors.EVENT_READ, ("process", agent))
            else:
                errors.append(AgentFailedError(agent.hostname, f"could not start the agent: {error}"))
        if errors:
            for e in errors[1:]:
                _add_note(errors[0], f"also: {e}")
            raise errors[0]

    def _accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        conn.settimeout(_HANDSHAKE_TIMEOUT_S)
        try:
            challenge = send_challenge(conn)
        except OSError:
            conn.close()
            return
        self.selector.register(conn, selectors.EVENT_READ, ("pending", challenge))

    def _authenticate(self, conn: socket.socket, challenge: bytes) -> None:
        self.selector.unregister(conn)
        try:
            verify_answer(conn, self.secret, challenge)
        except (AuthenticationFailed, ChannelClosed, OSError):
            conn.close()  # not one of ours: dropped, nothing it sent was unpickled
            return
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The agent says hello once it has imported torch: wait for it without blocking the others.
        self.selector.register(conn, selectors.EVENT_READ, ("authenticated", None))

    def _hello(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        try:
            header, _ = Channel(conn).recv()
        except (ChannelClosed, OSError, EOFError):
            conn.close()
            return
        if header[0] != "hello" or not (0 <= header[1] < len(self.agents)) or self.agents[header[1]].channel:
            conn.close()
            return
        agent = self.agents[header[1]]
        agent.channel = Channel(conn)
        agent.hello = header
        agent.peer_address = conn.getpeername()[0]
        self.selector.register(conn, selectors.EVENT_READ, ("agent", agent))
        if self.stopping:
            self._stop_agent(agent)
        elif self._all_started():
            self._send_start()

    def _send_start(self) -> None:
        if self.launcher.backend == "nccl":
            without_gpu = [a.hostname for a in self.agents if a.hello is not None and a.hello[4] == 0]
            if without_gpu:
                raise ConfigurationError(
                    f"backend='nccl' needs CUDA GPUs, but host {without_gpu[0]!r} has none: use backend='gloo' "
                    "(or 'auto', which picks nccl where there are GPUs and gloo where there are none)"
                )
        counts = [_worker_count(self.launcher.workers_per_host, a.index, a.hello) for a in self.agents]
        self.pipeline.open(RunInfo(self.start, [a.hostname for a in self.agents], counts))
        self.pipeline_open = True
        world_size = sum(counts)
        agent0 = self.agents[0]
        for agent, count in zip(self.agents, counts, strict=False):
            if self.store is not None:
                master_addr, master_port = self._launcher_address(agent.hostname), self.store.port
            else:  # no process group of ours: the user's own rendezvous on host 0
                master_addr, master_port = _host0_address(agent0), agent0.hello[6]  # type: ignore[index]
            launches = []
            for local_rank in range(count):
                rank = len(self.placement)
                self.placement.append((agent.hostname, local_rank))
                agent.ranks.append(rank)
                env = {
                    "RANK": str(rank),
                    "LOCAL_RANK": str(local_rank),
                    "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(count),
                    "NODE_RANK": str(agent.index),
                    "GROUP_RANK": str(agent.index),
                    "MASTER_ADDR": master_addr,
                    "MASTER_PORT": str(master_port),
                }
                launches.append(
                    WorkerLaunch(
                        rank,
                        local_rank,
                        env,
                        self.launcher.backend,
                        self.launcher.timeout,
                        tuple(sys.path),
                        self.launcher.hang_timeout,
                    )
                )
            assert agent.channel is not None
            agent.channel.send(("start", launches), *self.payload)

    # -- events from agents -----------------------------------------------------------
    def _from_agent(self, agent: _Agent) -> None:
        assert agent.channel is not None
        try:
            header, blob = agent.channel.recv()
        except ChannelClosed:
            self._agent_gone(agent, "its connection to the launcher closed")
            return
        kind = header[0]
        if kind == "logs":
            self._emit(agent, header[1])
        elif kind == "result":
            self.results[agent.ranks[header[1]]] = blob
        elif kind == "error":
            self._worker_raised(agent, header, blob)
        elif kind == "stalled":
            self._worker_stalled(agent, header)
        elif kind == "discard":
            self.results.pop(agent.ranks[header[1]], None)
        elif kind == "exit":
            self._worker_exited(agent, header[1], header[2])
        elif kind == "stopped":
            self._agent_gone(agent, "")

    def _emit(self, agent: _Agent, records: list[tuple[Any, ...]]) -> None:
        for created, local_rank, stream, level, message, logger in records:
            rank = agent.ranks[local_rank] if local_rank is not None and local_rank < len(agent.ranks) else None
            record = LogRecord(created, agent.hostname, local_rank, rank, stream, level, message, logger)
            self.pipeline.emit(record)

    def _worker_raised(self, agent: _Agent, header: tuple[Any, ...], blob: bytearray) -> None:
        _, local_rank, type_name, message, traceback_text = header
        rank = agent.ranks[local_rank]
        exception: BaseException
        try:
            exception = _pickling.loads(blob) if blob else WorkerError(type_name, message)
        except Exception:
            exception = WorkerError(type_name, message)
        where = f"host {agent.hostname!r}, rank {rank} (local rank {local_rank})"
        attach_remote_traceback(exception, where, traceback_text)
        self.exits.setdefault(rank, "raised an exception")
        self._fail(exception, f"rank {rank} on {agent.hostname!r} raised {type_name}: {message}")

    def _worker_stalled(self, agent: _Agent, header: tuple[Any, ...]) -> None:
        _, local_rank, seconds, where = header
        self.stalled[agent.ranks[local_rank]] = (agent.hostname, seconds, where)
        if self.hang_at is None and not self.stopping:
            # Have every worker write its stack to its log and say how long it has been stuck,
            # so that the error names every stuck rank, not only the first to notice.
            for other in self.agents:
                if other.channel is not None and not other.finished:
                    with contextlib.suppress(ChannelClosed):
                        other.channel.send(("dump",))
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

    def _agent_gone(self, agent: _Agent, reason: str) -> None:
        if agent.channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(agent.channel.fileno())
            agent.channel.close()
            agent.channel = None
        if not agent.finished and not self.stopping:
            if agent.process is not None:
                time.sleep(0.05)  # let the executor see the exit status, for a better message
                reason = agent.process.poll() or reason
            error = AgentFailedError(agent.hostname, reason)
            self._fail(error, str(error))
        agent.finished = True

    # -- stopping ---------------------------------------------------------------------
    def _fail(self, exception: BaseException, summary: str) -> None:
        self.failures.append(_Failure(exception, summary))
        if self.stop_at is None:
            # Ranks hitting the same bug raise within moments of each other: gather them
            # briefly so that one error reports them all. A death needs no such wait.
            raised = not isinstance(exception, (WorkerFailedError, AgentFailedError))
            self.stop_at = time.monotonic() + (_GATHER_S if raised else 0.0)

    def _stop_all(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + _STOP_GRACE_S
        for agent in self.agents:
            self._stop_agent(agent)

    def _stop_agent(self, agent: _Agent) -> None:
        if agent.channel is None:
            agent.finished = True  # not connected (any more): the executor stops it in close()
            return
        try:
            agent.channel.send(("stop",))
        except ChannelClosed:
            self._agent_gone(agent, "its connection to the launcher closed")

    def _result(self) -> LaunchResult:
        return LaunchResult({r: _pickling.loads(b) for r, b in self.results.items()}, self.placement)

    def close(self) -> None:
        """Stop every agent and release every socket of the run. Safe to call at any point."""
        try:
            for agent in self.agents:
                if agent.channel is not None and not agent.finished:
                    with contextlib.suppress(ChannelClosed):
                        agent.channel.send(("stop",))
            processes = [a.process for a in self.agents if a.process is not None]
            if len(processes) > 1:  # each may take a moment (a remote kill): all at once
                with ThreadPoolExecutor(max_workers=min(len(processes), 64)) as pool:
                    list(pool.map(lambda process: process.stop(), processes))
            elif processes:
                processes[0].stop()
            for agent in self.agents:
                if agent.channel is not None:
                    agent.channel.close()
        finally:
            for key in list(self.selector.get_map().values()):
                if key.data[0] in ("pending", "authenticated"):
                    key.fileobj.close()  # type: ignore[union-attr]
            self.selector.close()
            if self.listener is not None:
                self.listener.close()
            self.store = None
            if self.pipeline_open:
                self.pipeline.close()


def _capture(fn: Callable[[_Agent], AgentProcess], agent: _Agent) -> tuple[AgentProcess | None, str]:
    try:
        return fn(agent), ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _start_store(host: str, timeout: int) -> Any:
    import torch.distributed as dist

    # Port 0: the kernel picks a free port and the store keeps it for the whole run.
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout), wait_for_workers=False)  # type: ignore[attr-defined]


def _worker_count(spec: object, index: int, hello: tuple[Any, ...] | None) -> int:
    assert hello is not None
    gpus, cpus = hello[4], hello[5]
    if isinstance(spec, int):
        return spec
    if isinstance(spec, (list, tuple)):
        return int(spec[index])
    if spec == "gpu":
        if gpus == 0:
            raise ConfigurationError(f"workers_per_host='gpu' but host {hello[2]!r} has no GPU")
        return int(gpus)
    if spec == "cpu":
        return int(cpus)
    return int(gpus) or 1


def _host0_address(agent0: _Agent) -> str:
    return "127.0.0.1" if _is_loopback(agent0.peer_address) else agent0.peer_address


def _is_loopback(address: str) -> bool:
    return address in ("localhost", "::1") or address.startswith("127.")


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def _combined(failures: list[_Failure]) -> BaseException:
    """One exception for all failures. A dead agent or worker is the likely cause of what
    its peers raised (connection reset in a collective...), so it is preferred; otherwise the
    first to arrive. The others are attached as notes."""

    def precedence(f: _Failure) -> int:
        return {AgentFailedError: 0, WorkerFailedError: 1}.get(type(f.exception), 2)

    primary = min(failures, key=precedence)  # min is stable: first arrival among equals
    for other in failures:
        if other is not primary and other.summary:
            _add_note(primary.exception, f"also failed: {other.summary}")
    return primary.exception


logging.getLogger(__name__).addHandler(logging.NullHandler())
