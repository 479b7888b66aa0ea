"""The launcher's side of debugging: pdb sessions of paused ranks in the launcher's terminal, and
every rank's Python stack on demand (`print_stacks`, Ctrl-\\).

A supervisor's `DebugConsole` is opened for each of its runs (a warm session has many) and served
by its selector loop: the terminal's standard input and a wake-up pipe (for `print_stacks`
called from another thread) are registered there, next to the agents' connections. The messages are those of
`trx_core.protocol`: a worker at a breakpoint says `WorkerPaused`; with a terminal here the
console answers `DebuggerReply(accepted=True)`, then shows what the worker's pdb writes
(`DebuggerOutput`) and sends it each command line typed (`DebuggerInput`), both ways through
the rank's agent (`ForWorkers`). Without a terminal the breakpoint is refused: the worker
logs it and goes on, and this side says it once on stderr.

The terminal, while a session is open: commands go to the rank named in the prompt (the
*current* rank); a line starting with ``@`` is the console's own (``@`` lists paused ranks,
``@N`` switches to rank N, ``@all CMD`` or ``@0,2-3 CMD`` sends CMD to several paused ranks).
Text that the program writes meanwhile (rank 0's log on the console) goes above the prompt,
which is written again after it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import sys
import threading
import time
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from .errors import ConfigurationError
from .protocol import (
    POST_MORTEM_VAR,
    DebuggerInput,
    DebuggerOutput,
    DebuggerReply,
    ForWorkers,
    Message,
    SendStacks,
    WorkerPaused,
    WorkerStacks,
)

if TYPE_CHECKING:
    from ._run_events import AgentHandle, RunEvents

__all__ = ["DebugConsole", "check_post_mortem", "launcher_terminal", "post_mortem_env", "print_stacks"]

_RESUMING = frozenset({"c", "cont", "continue", "q", "quit", "exit", "EOF"})  # pdb commands that leave the prompt
_HELP = (
    "commands go to the rank in the prompt; @ lists the paused ranks, @N switches to rank N, "
    "@all CMD or @0,2-3 CMD sends CMD to several paused ranks; Ctrl-C stops the run"
)

_live_lock = threading.Lock()
_live: list[DebugConsole] = []  # consoles of the runs in progress in this process


def launcher_terminal() -> TextIO | None:
    """The stream to show a debugger on, if this process has a terminal to debug in: standard
    input a terminal whose foreground this process is (reading it from the background would stop
    the process), and standard output or error on a terminal. None otherwise (a batch job, a
    notebook, a pipe)."""
    try:
        if sys.stdin is None or not sys.stdin.isatty() or os.tcgetpgrp(sys.stdin.fileno()) != os.getpgrp():
            return None
    except (OSError, ValueError, AttributeError):
        return None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if stream is not None and stream.isatty():
                return stream
    return None


def check_post_mortem(post_mortem: bool) -> None:
    """Refuse post_mortem=True when there is no terminal to debug in."""
    if post_mortem and launcher_terminal() is None:
        raise ConfigurationError(
            "post_mortem=True needs a terminal to debug in, and this program has none (its standard input is "
            "not a terminal in the foreground: a batch job, a notebook, a pipe); run it from a terminal, or set "
            "post_mortem=False (the worker's traceback is attached to the exception either way)"
        )


def post_mortem_env(post_mortem: bool) -> dict[str, str]:
    """What the workers' environment gets for the launcher's `post_mortem` setting."""
    return {POST_MORTEM_VAR: "1"} if post_mortem else {}


def print_stacks(file: TextIO | None = None, timeout: float = 5.0) -> None:
    """Print the Python stack of every rank of every run in progress in this process.

    Callable from any thread while runs go on (e.g. a watchdog thread of your program); Ctrl-\\
    (SIGQUIT) in the launcher's terminal does the same while a run started from the main
    thread is in progress. Each rank answers through the run's own connections, with every
    Python thread's stack, innermost call last; ranks whose stacks are identical are printed
    once, with their ranks listed. A rank that does not answer within `timeout` seconds (a
    thread holding the GIL in native code keeps it from answering) is named as such.

    Prints to `file` (default: standard error).
    """
    with _live_lock:
        consoles = list(_live)
    if not consoles:
        text = "torchrunx: no run in progress\n"
    else:
        requests = [(console, console.request_stacks()) for console in consoles]
        end = time.monotonic() + timeout
        for console, request in requests:
            if not console.served_by_this_thread():
                request.done.wait(max(0.0, end - time.monotonic()))
        text = "".join(request.render(timeout) for _, request in requests)
    stream = file if file is not None else sys.stderr
    if stream is not None:
        stream.write(text)
        stream.flush()


def _on_sigquit(signum: int, frame: FrameType | None) -> None:
    # A handler must not wait for the loop it interrupts: a thread gathers the stacks.
    threading.Thread(target=print_stacks, name="torchrunx-print-stacks", daemon=True).start()


class _Screen:
    """The launcher's terminal while a debugger session is open: whatever the program writes to
    standard output or error goes above the prompt, which is written again after it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.owner: DebugConsole | None = None
        self._out: TextIO | None = None  # where the prompt is
        self._saved: tuple[Any, Any] = (None, None)  # sys.stdout and sys.stderr before ours
        self._prompt = ""
        self._shown = False

    def take(self, owner: DebugConsole, out: TextIO) -> None:
        with self.lock:
            self.owner, self._out = owner, out
            self._saved = (sys.stdout, sys.stderr)
            sys.stdout = _AbovePrompt(sys.stdout, self)
            sys.stderr = _AbovePrompt(sys.stderr, self)

    def release(self, owner: DebugConsole) -> None:
        with self.lock:
            if self.owner is not owner:
                return
            self._hide()
            self._prompt = ""
            stdout, stderr = self._saved
            if isinstance(sys.stdout, _AbovePrompt) and sys.stdout.screen is self:
                sys.stdout = stdout
            if isinstance(sys.stderr, _AbovePrompt) and sys.stderr.screen is self:
                sys.stderr = stderr
            self.owner, self._out, self._saved = None, None, (None, None)

    def write(self, text: str) -> None:
        """Whole lines for the terminal, where the prompt was: the console shows the prompt it
        wants next (`prompt`)."""
        with self.lock:
            if self._out is None:
                return
            self._hide()
            self._out.write(text)
            self._out.flush()

    def prompt(self, text: str) -> None:
        """Show `text` as the prompt from now on ("": none)."""
        with self.lock:
            if text == self._prompt and (self._shown or not text):
                return
            self._hide()
            self._prompt = text
            self._show()

    def entered(self) -> None:
        """The user pressed Enter: the cursor is at the start of a new line, the prompt scrolled up."""
        with self.lock:
            self._shown = False

    def hide(self) -> None:
        with self.lock:
            self._hide()

    def show(self) -> None:
        with self.lock:
            self._show()

    def _hide(self) -> None:
        if self._shown and self._out is not None:
            self._out.write("\r\x1b[K")  # back to the start of the prompt's line, and clear it
            self._out.flush()
            self._shown = False

    def _show(self) -> None:
        if self._out is None:
            return
        if self._prompt and not self._shown:
            self._out.write(self._prompt)
            self._shown = True
        self._out.flush()


class _AbovePrompt:
    """Stands for sys.stdout or sys.stderr while a prompt may be on the terminal."""

    def __init__(self, stream: Any, screen: _Screen) -> None:
        self.stream = stream
        self.screen = screen

    def write(self, text: str) -> int:
        with self.screen.lock:
            self.screen.hide()
            written: int = self.stream.write(text)
            if text.endswith("\n"):
                self.stream.flush()
                self.screen.show()
            return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


_screen = _Screen()


class _StackRequest:
    """One `print_stacks` call's view of one run: which ranks were asked, what they answered."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.done = threading.Event()
        self.labels: dict[int, str] = {}  # the ranks asked -> "host local N"
        self.got: dict[int, tuple[tuple[str, str], ...]] = {}
        self.note = ""

    def finish(self, note: str = "") -> None:
        self.note = self.note or note
        self.done.set()

    def render(self, timeout: float) -> str:
        lines = [f"torchrunx: Python stacks of the run started at {self.start:%H:%M:%S}, innermost call last"]
        if self.note:
            lines.append(f"  ({self.note})")
        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for rank in sorted(self.got):
            groups.setdefault(self.got[rank], []).append(rank)
        for threads, ranks in groups.items():
            lines.append(f"--- {_describe(ranks, self.labels)} ---")
            for name, stack in threads:
                lines.append(f"Thread {name}:")
                lines.append(stack.rstrip("\n") or "  (no Python frame)")
        silent = sorted(set(self.labels) - set(self.got))
        if silent:
            lines.append(
                f"--- {_describe(silent, self.labels)}: no answer within {timeout:g} s "
                "(a thread holding the GIL in native code?) ---"
            )
        return "\n".join(lines) + "\n"


class DebugConsole:
    """One run's debugger sessions and stack requests, served by the run's selector loop."""

    def __init__(self, run: RunEvents) -> None:
        self._run = run
        self._lock = threading.Lock()  # guards what print_stacks touches from other threads
        self._wake: tuple[int, int] | None = None
        self._new_requests: list[_StackRequest] = []
        self._asked: list[_StackRequest] = []  # sent to the workers, waiting for their answers
        self._loop_thread = 0
        self._previous_sigquit: Any = None
        self._catches_sigquit = False
        self._stdin: int | None = None  # registered in the run's selector while sessions are open
        self._begin()

    def _begin(self) -> None:
        """A new run: no rank stopped yet."""
        self._typed = b""
        self._waiting: dict[int, str] = {}  # rank -> its pdb prompt: ranks waiting for a command line
        self._paused_at: dict[int, str] = {}  # rank -> what it stopped at, where
        self._held: dict[int, list[str]] = {}  # output of ranks other than the current one, not shown yet
        self._answering: set[int] = set()  # ranks sent a command meant for several: shown with their rank
        self._current: int | None = None  # the rank the prompt is for
        self._expected = False  # the current rank is running a command and will be back at a prompt
        self._skipped: set[str] = set()  # where refused breakpoints were, already said on stderr
        self._greeted = False

    # -- lifecycle (each run of the supervisor) ----------------------------------------------
    def open(self) -> None:
        """A run begins in this thread: serve its stack requests (and Ctrl-\\, from the main
        thread) and its breakpoints until `close()`."""
        if self._wake is not None:
            return
        self._begin()
        self._loop_thread = threading.get_ident()
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self._wake = (read_end, write_end)
        self._run.selector.register(read_end, selectors.EVENT_READ, ("debug", "wake"))
        if threading.current_thread() is threading.main_thread():
            self._previous_sigquit = signal.signal(signal.SIGQUIT, _on_sigquit)
            self._catches_sigquit = True
        with _live_lock:
            _live.append(self)

    def close(self) -> None:
        """The run is over: end its sessions, give the terminal and SIGQUIT back. Safe to repeat."""
        with _live_lock:
            if self in _live:
                _live.remove(self)
        if self._catches_sigquit:
            self._catches_sigquit = False
            previous = self._previous_sigquit
            signal.signal(signal.SIGQUIT, previous if previous is not None else signal.SIG_DFL)
        if self._stdin is not None:
            self._forget_stdin()
        if _screen.owner is self:
            if self._waiting:
                _screen.write(
                    f"torchrunx: the run is over, and the debugger sessions of rank(s) {_span(list(self._waiting))}\n"
                )
            _screen.release(self)
        with self._lock:
            wake, self._wake = self._wake, None
            requests, self._new_requests = self._new_requests + self._asked, []
            self._asked = []
        for request in requests:
            request.finish("the run ended before every rank answered")
        if wake is not None:
            with contextlib.suppress(KeyError, ValueError, RuntimeError):
                self._run.selector.unregister(wake[0])
            for fd in wake:
                os.close(fd)

    def holds_ranks(self) -> bool:
        """Whether a rank is stopped in the debugger: its peers may wait for it, and are not hung."""
        return bool(self._waiting) or self._expected

    def served_by_this_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    # -- events -------------------------------------------------------------------------------
    def on_ready(self, what: str) -> None:
        """The selector says: the terminal has a line ("stdin"), or stacks were asked for ("wake")."""
        if what == "stdin":
            self._read_terminal()
        else:
            self._serve_requests()

    def from_worker(self, agent: AgentHandle, message: Message) -> None:
        """A debugger message of one of `agent`'s workers."""
        match message:  # (late ones, from a run that has ended, are answered or dropped)
            case WorkerPaused(local_rank, where, why):
                self._paused(agent, local_rank, where, why)
            case DebuggerOutput(local_rank, text, prompt) if local_rank < len(agent.ranks):
                self._output(agent.ranks[local_rank], text, prompt)
            case WorkerStacks(local_rank, threads) if local_rank < len(agent.ranks):
                self._stacks(agent.ranks[local_rank], threads)

    # -- sessions ---------------------------------------------------------------------------
    def _paused(self, agent: AgentHandle, local_rank: int, where: str, why: str) -> None:
        if self._wake is None or not self._running() or local_rank >= len(agent.ranks):
            # the run is ending: its workers are about to be stopped
            self._run._send(agent, ForWorkers((local_rank,), DebuggerReply(False, "the run is ending")))
            return
        rank = agent.ranks[local_rank]
        refusal = self._refusal()
        if refusal:
            self._run._send(agent, ForWorkers((local_rank,), DebuggerReply(False, refusal)))
            if where not in self._skipped:  # a breakpoint in a loop: said once, logged every time
                self._skipped.add(where)
                print(
                    f"torchrunx: [{self._label(rank)}] {why} at {where} skipped: {refusal} "
                    "(said once per line; each skip is in the rank's log)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        self._take_terminal()
        self._run._send(agent, ForWorkers((local_rank,), DebuggerReply(True)))
        self._paused_at[rank] = f"{why} at {where}"
        self._waiting.pop(rank, None)
        if not self._greeted:
            self._greeted = True
            _screen.write(f"torchrunx: debugging in this terminal: {_HELP}\n")
        if self._current is None or (self._current not in self._waiting and not self._expected):
            self._current, self._expected = rank, True
            _screen.write(f"torchrunx: [{self._label(rank)}] stopped: {why} at {where}\n")
        else:
            _screen.write(f"torchrunx: [{self._label(rank)}] stopped too: {why} at {where} (@{rank} switches to it)\n")
        self._settle()

    def _output(self, rank: int, text: str, prompt: str | None) -> None:
        if text and not text.endswith("\n"):
            text += "\n"
        if prompt is not None:
            self._waiting[rank] = prompt
        if rank in self._answering:
            if text:
                _screen.write("".join(f"[rank {rank}] {line}\n" for line in text.splitlines()))
            if prompt is not None:
                self._answering.discard(rank)
                if rank == self._current:
                    self._expected = False
        elif rank == self._current:
            if text:
                _screen.write(text)
            if prompt is not None:
                self._expected = False
        elif text:
            self._held.setdefault(rank, []).append(text)
        self._settle()

    def _settle(self) -> None:
        """Give the prompt to the current rank if it waits; else, unless it is expected back, to the
        first rank that waits."""
        if self._waiting and self._current not in self._waiting and not self._expected:
            self._switch(min(self._waiting))
        if self._current is not None and self._current in self._waiting:
            _screen.prompt(f"[{self._label(self._current)}] {self._waiting[self._current]}")
        else:
            _screen.prompt("")

    def _switch(self, rank: int) -> None:
        self._current = rank
        self._expected = rank not in self._waiting
        held = "".join(self._held.pop(rank, []))
        _screen.write(f"torchrunx: now at [{self._label(rank)}], stopped: {self._paused_at.get(rank, '?')}\n{held}")

    def _read_terminal(self) -> None:
        assert self._stdin is not None
        try:
            data = os.read(self._stdin, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # Ctrl-D: pdb's EOF (quit) for the current rank; else stop reading until a rank stops
            _screen.entered()
            _screen.write("\n")
            if self._current in self._waiting:
                self._line("EOF")
            else:
                self._forget_stdin()
                self._settle()
            return
        self._typed += data
        while b"\n" in self._typed:
            line, _, self._typed = self._typed.partition(b"\n")
            _screen.entered()
            self._line(line.decode(errors="replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        if line.startswith("@"):
            self._command(line[1:].strip())
        elif self._current is not None and self._current in self._waiting:
            self._send_line(self._current, line)
        elif self._waiting:
            _screen.write(
                f"torchrunx: rank {self._current} is running; waiting at a prompt: "
                f"{_span(sorted(self._waiting))} (@N switches to rank N)\n"
            )
        else:
            _screen.write("torchrunx: no rank waits for a command\n")
        self._settle()

    def _send_line(self, rank: int, line: str) -> None:
        del self._waiting[rank]
        self._send(rank, DebuggerInput(line))
        if rank == self._current:
            words = line.split()
            self._expected = not (words and words[0] in _RESUMING)

    def _command(self, rest: str) -> None:
        target, _, command = rest.partition(" ")
        command = command.strip()
        if not target:
            self._list()
            return
        ranks = self._parse(target)
        if ranks is None:
            _screen.write(f"torchrunx: {_HELP}\n")
        elif not command:
            if len(ranks) != 1 or ranks[0] not in self._paused_at:
                _screen.write(f"torchrunx: rank {target} has not stopped in the debugger (@ lists those that have)\n")
            else:
                self._switch(ranks[0])
        else:
            sent = [rank for rank in ranks if rank in self._waiting]
            for rank in sent:
                self._answering.add(rank)
                self._send_line(rank, command)
            others = [rank for rank in ranks if rank not in self._waiting]
            if others and target != "all":
                _screen.write(f"torchrunx: not sent to rank(s) {_span(others)}: not waiting for a command\n")
            if not sent:
                _screen.write("torchrunx: no rank waits for a command\n")

    def _list(self) -> None:
        lines = ["torchrunx: ranks stopped in the debugger (> the prompt's; * waiting for a command):"]
        for rank in sorted(self._paused_at):
            mark = (">" if rank == self._current else " ") + ("*" if rank in self._waiting else " ")
            lines.append(f"  {mark} [{self._label(rank)}] {self._paused_at[rank]}")
        lines.append(f"  {_HELP}")
        _screen.write("\n".join(lines) + "\n")

    def _parse(self, target: str) -> list[int] | None:
        if target == "all":
            return sorted(self._waiting)
        ranks: list[int] = []
        try:
            for part in target.split(","):
                low, _, high = part.partition("-")
                ranks.extend(range(int(low), int(high or low) + 1))
        except ValueError:
            return None
        return ranks

    def _refusal(self) -> str:
        """Why a rank that stopped cannot have a session now ("": it can)."""
        if _screen.owner is not None and _screen.owner is not self:
            return "another run of this program is debugging in the terminal"
        if _screen.owner is None and launcher_terminal() is None:
            return (
                "the launcher has no terminal (its standard input is not a terminal in the foreground: "
                "a batch job, a notebook, a pipe)"
            )
        return ""

    def _take_terminal(self) -> None:
        if _screen.owner is None:
            out = launcher_terminal()
            assert out is not None  # checked by _refusal
            _screen.take(self, out)
        if self._stdin is None:
            self._stdin = sys.stdin.fileno()
            self._run.selector.register(self._stdin, selectors.EVENT_READ, ("debug", "stdin"))

    def _forget_stdin(self) -> None:
        assert self._stdin is not None
        with contextlib.suppress(KeyError, ValueError, RuntimeError):
            self._run.selector.unregister(self._stdin)
        self._stdin = None

    def _running(self) -> bool:
        from ._run_events import Phase  # loaded with the supervisor; not at `import trx_core` (print_stacks)

        return self._run.phase is Phase.RUNNING

    def _send(self, rank: int, message: Message) -> None:
        for agent in self._run.agents:
            if rank in agent.ranks and agent.channel is not None and not agent.finished:
                self._run._send(agent, ForWorkers((agent.ranks.index(rank),), message))

    def _label(self, rank: int) -> str:
        hostname, local_rank = self._run.placement[rank]
        return f"{hostname} rank {rank} local {local_rank}"

    # -- stacks -----------------------------------------------------------------------------
    def request_stacks(self) -> _StackRequest:
        """Ask (from any thread) for the stacks of this run's ranks; the request's `done` is set
        once they have all answered, or the run has ended."""
        request = _StackRequest(self._run.start_time)
        with self._lock:
            if self._wake is None:
                request.finish("the run has ended")
                return request
            if self.served_by_this_thread():
                request.finish("asked from the thread that follows this run, which cannot gather them meanwhile")
                return request
            self._new_requests.append(request)
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake[1], b"\0")
        return request

    def _serve_requests(self) -> None:
        with self._lock:
            assert self._wake is not None
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake[0], 512):
                    pass
            new, self._new_requests = self._new_requests, []
        running = self._run._ranks_running() if self._running() else []
        for request in new:
            if not running:
                request.finish("no worker is running: the run is starting or ending")
            request.labels = {rank: "{} local {}".format(*self._run.placement[rank]) for rank in running}
        new = [request for request in new if request.labels]
        if not new:
            return
        for agent in self._run.agents:
            if agent.channel is not None and not agent.finished and any(rank in running for rank in agent.ranks):
                self._run._send(agent, ForWorkers((), SendStacks()))
        with self._lock:
            self._asked.extend(new)

    def _stacks(self, rank: int, threads: tuple[tuple[str, str], ...]) -> None:
        with self._lock:
            for request in self._asked:
                if rank in request.labels:
                    request.got[rank] = threads
            done = [request for request in self._asked if set(request.got) >= set(request.labels)]
            self._asked = [request for request in self._asked if request not in done]
        for request in done:
            request.finish()


def _describe(ranks: list[int], labels: dict[int, str]) -> str:
    """``rank 1 (host1 local 1)``, ``ranks 0-3 (host1 local 0-1, host2 local 0-1)``."""
    by_host: dict[str, list[int]] = {}
    for rank in ranks:
        hostname, _, local = labels[rank].rpartition(" local ")
        by_host.setdefault(hostname, []).append(int(local))
    where = ", ".join(f"{hostname} local {_span(locals_)}" for hostname, locals_ in by_host.items())
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {_span(ranks)} ({where})"


def _span(numbers: list[int]) -> str:
    """``0-3, 5``."""
    parts: list[str] = []
    start = previous = None
    for n in [*sorted(numbers), None]:
        if n is not None and previous is not None and n == previous + 1:
            previous = n
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = n
    return ", ".join(parts)
