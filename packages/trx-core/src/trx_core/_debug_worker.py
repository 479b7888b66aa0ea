"""The worker's side of debugging from the launcher's terminal: ``breakpoint()``, post-mortem, stacks.

`WorkerDebugger` takes over ``sys.breakpointhook`` and ``pdb.set_trace`` in a worker. At a
breakpoint the worker tells the launcher (`WorkerPaused`) and waits for its answer
(`DebuggerReply`). Accepted, a `pdb.Pdb` runs whose input lines arrive as `DebuggerInput` and
whose output leaves as `DebuggerOutput`, over the worker's control socket (the agent relays
both ways), so the session reaches the launcher's terminal from any host without another port.
Refused (the launcher has no terminal), the worker logs the skipped breakpoint and goes on.

The thread that reads the control socket (`trx_core._progress.watch_progress`) hands these
messages to `WorkerDebugger.on_message`, which also answers `SendStacks` with the Python stack
of every thread (`WorkerStacks`).
"""

from __future__ import annotations

import bdb
import cmd
import contextlib
import logging
import os
import pdb  # imported once by the agent: the workers forked from it have it at no cost
import queue
import sys
import threading
import traceback
import types
from collections.abc import Iterator
from typing import Any, Protocol

from .protocol import (
    POST_MORTEM_VAR,
    DebuggerInput,
    DebuggerOutput,
    DebuggerReply,
    Message,
    SendStacks,
    WorkerPaused,
    WorkerStacks,
)

__all__ = ["WorkerDebugger", "thread_stacks"]

_logger = logging.getLogger("torchrunx")
_DEBUGGER_FILES = {os.path.abspath(m.__file__ or "") for m in (bdb, cmd, pdb)} | {os.path.abspath(__file__)}


class _Sender(Protocol):
    def send(self, message: Message, *blob: bytes | memoryview) -> None: ...


class WorkerDebugger:
    """A worker's debugger: owns its breakpoint hook, the pdb sessions, and their channel to the launcher."""

    def __init__(self, control: _Sender, local_rank: int) -> None:
        self._control = control
        self._local_rank = local_rank
        self._pid = os.getpid()
        self._post_mortem = os.environ.get(POST_MORTEM_VAR) == "1"
        self._inbox: queue.SimpleQueue[DebuggerReply | DebuggerInput | None] = queue.SimpleQueue()
        # One session at a time: a second thread at a breakpoint waits for the first one's prompt to end.
        self._session = threading.RLock()
        self._paused = 0  # threads waiting for the launcher (a reply or a command line)
        self._count_lock = threading.Lock()

    @property
    def paused(self) -> bool:
        """Whether a thread waits in the debugger for the launcher: not a hang, for the progress watch."""
        return self._paused > 0

    def install(self) -> None:
        """``breakpoint()``, ``pdb.set_trace()`` and ``torch.distributed.breakpoint()`` open pdb in
        the launcher's terminal from now on."""
        sys.breakpointhook = self.breakpoint
        setattr(pdb, "set_trace", self.set_trace)  # noqa: B010 (mypy refuses assigning to a module's function)
        distributed = sys.modules.get("torch.distributed")  # imported by the agent already
        if distributed is not None and hasattr(distributed, "_make_distributed_pdb"):
            setattr(distributed, "_make_distributed_pdb", self.make_distributed_pdb)  # noqa: B010 (torch-private)

    # -- the reading thread's side ----------------------------------------------------
    def on_message(self, message: Message) -> None:
        """Handle a message from the launcher (called by the thread that reads the control socket)."""
        match message:
            case DebuggerReply() | DebuggerInput():
                self._inbox.put(message)
            case SendStacks():
                self._control.send(WorkerStacks(self._local_rank, thread_stacks()))

    def channel_closed(self) -> None:
        """The agent is gone: a thread waiting for the launcher must not wait forever."""
        self._inbox.put(None)

    # -- entry points -------------------------------------------------------------------
    def breakpoint(self, *args: Any, **kwargs: Any) -> None:
        """``sys.breakpointhook``: pause in pdb at the caller's line (arguments are ignored, as pdb's)."""
        if os.environ.get("PYTHONBREAKPOINT") == "0":  # as Python does: breakpoint() turned off
            return
        self._trace(sys._getframe(1), None)

    def set_trace(self, *, header: str | None = None, **ignored: Any) -> None:
        """``pdb.set_trace``, in the launcher's terminal."""
        self._trace(sys._getframe(1), header)

    def make_distributed_pdb(self) -> Any:
        """``torch.distributed.breakpoint``'s debugger (its ``_make_distributed_pdb``): torch's own
        breakpoint then keeps the other ranks in a barrier while this one is in the session."""
        with self._session:
            debugger = self._open(sys._getframe(2), "torch.distributed.breakpoint()")
        return debugger if debugger is not None else _NoPdb()

    def post_mortem(self, exc: BaseException) -> None:
        """With post_mortem on: open pdb at the frame that raised `exc`, before it is reported."""
        if not self._post_mortem or isinstance(exc, (SystemExit, KeyboardInterrupt, bdb.BdbQuit)):
            return
        tb = exc.__traceback__
        if tb is None or os.getpid() != self._pid:
            return
        last = tb
        while last.tb_next is not None:
            last = last.tb_next
        where = _frame_where(last.tb_frame, last.tb_lineno)
        try:
            with self._session:
                if self._ask(where, f"post-mortem of {type(exc).__name__}: {_safe_str(exc)}"):
                    debugger = _ChannelPdb(self)
                    debugger.reset()
                    debugger.interaction(None, tb)
        except Exception as e:  # the exception of the function is what the run reports, not this
            _logger.warning("post-mortem debugging failed: %s: %s", type(e).__name__, e)

    def _trace(self, frame: types.FrameType, header: str | None) -> None:
        with self._session:
            debugger = self._open(frame, "breakpoint()")
            if debugger is None:
                return
            if header is not None:
                debugger.message(header)
            debugger.set_trace(frame)

    def _open(self, frame: types.FrameType, why: str) -> _ChannelPdb | None:
        """A debugger for a stop at `frame`, if the launcher opens a session for it."""
        where = _frame_where(frame, frame.f_lineno)
        if os.getpid() != self._pid:
            # A process the worker forked has no channel of its own to the launcher.
            print(f"torchrunx: {why} at {where} skipped: in a process forked by a worker", file=sys.stderr)
            return None
        if not self._ask(where, why):
            return None
        return _ChannelPdb(self)

    # -- talking to the launcher ----------------------------------------------------------
    def _ask(self, where: str, why: str) -> bool:
        """Tell the launcher we stopped; whether it opens a session for us."""
        self._control.send(WorkerPaused(self._local_rank, where, why))
        reply = self._receive(DebuggerReply)
        if reply is None or not reply.accepted:
            reason = reply.reason if reply is not None else "the agent is gone"
            _logger.warning("%s at %s skipped: %s", why, where, reason)
            return False
        return True

    def _receive(self, kind: type[Any]) -> Any:
        """The next message of `kind` from the launcher (None if the channel closed)."""
        with self.pausing():
            while True:
                message = self._inbox.get()
                if message is None:
                    self._inbox.put(None)  # for whoever waits next
                    return None
                if isinstance(message, kind):
                    return message

    @contextlib.contextmanager
    def pausing(self) -> Iterator[None]:
        """While the body runs, this thread waits for the launcher (not a hang)."""
        with self._count_lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._paused -= 1

    def output(self, text: str, prompt: str | None) -> None:
        """Send pdb's output (and, with `prompt`, that it waits for a line)."""
        if text or prompt is not None:
            self._control.send(DebuggerOutput(self._local_rank, text, prompt))

    def read_line(self) -> str:
        """The next command line typed for this worker ("" once the channel is gone: pdb's EOF)."""
        message = self._receive(DebuggerInput)
        return "" if message is None else message.line + "\n"


class _NoPdb:
    """What torch.distributed.breakpoint() gets when the launcher refused the session: nothing happens."""

    def message(self, text: str) -> None:
        pass

    def set_trace(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Output:
    """pdb's standard output: collected, and sent with the next prompt (or when the session pauses)."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        text, self._parts = "".join(self._parts), []
        return text


class _Input:
    """pdb's standard input: each line comes from the launcher's terminal."""

    def __init__(self, debugger: WorkerDebugger, owner: _ChannelPdb, output: _Output) -> None:
        self._debugger = debugger
        self._owner = owner
        self._output = output

    def readline(self) -> str:
        text, prompt = self._output.take(), self._owner.prompt
        if text.endswith(prompt):  # cmd wrote it just before asking for a line: the launcher shows its own
            text = text[: -len(prompt)]
        self._debugger.output(text, prompt)
        return self._debugger.read_line()


class _ChannelPdb(pdb.Pdb):
    """pdb whose terminal is the launcher's."""

    def __init__(self, debugger: WorkerDebugger) -> None:
        self._output = _Output()
        self._debugger = debugger
        # nosigint: the worker's SIGINT handling stays the program's (Ctrl-C is the launcher's anyway);
        # skip: stepping out of the user's function does not stop in the worker's own frames
        super().__init__(
            stdin=_Input(debugger, self, self._output),  # type: ignore[arg-type]
            stdout=self._output,  # type: ignore[arg-type]
            nosigint=True,
            skip=["trx_core.*"],
        )

    def get_stack(
        self, f: types.FrameType | None, t: types.TracebackType | None
    ) -> tuple[list[tuple[types.FrameType, int]], int]:
        """The stack from the user's function on: `where` and `up` do not go into the agent and
        worker frames that called it."""
        stack, index = super().get_stack(f, t)
        calls = [
            i for i, (frame, _) in enumerate(stack) if _is_worker_run(frame.f_code.co_filename, frame.f_code.co_name)
        ]
        if calls and calls[-1] < index:
            cut = calls[-1] + 1
            return stack[cut:], index - cut
        return stack, index

    def dispatch_return(self, frame: types.FrameType, arg: Any) -> Any:
        trace = super().dispatch_return(frame, arg)
        caller = frame.f_back
        if caller is not None and _is_worker_run(caller.f_code.co_filename, caller.f_code.co_name):
            self.set_continue()  # the user's function returned: what the worker does next is not theirs to step through
        return trace

    def interaction(self, frame: types.FrameType | None, tb: types.TracebackType | None) -> None:
        with self._debugger._session:
            try:
                super().interaction(frame, tb)
            finally:
                self._debugger.output(self._output.take(), None)  # e.g. what `c` printed


def thread_stacks() -> tuple[tuple[str, str], ...]:
    """Every Python thread's stack but the caller's, main thread first, innermost call last; the
    worker's own frames (how the function was called) and the debugger's are left out."""
    me = threading.get_ident()
    main = threading.main_thread().ident
    names = {t.ident: t.name for t in threading.enumerate()}
    found = []
    for ident, frame in sorted(sys._current_frames().items(), key=lambda item: item[0] != main):
        if ident == me:
            continue
        stack = traceback.extract_stack(frame)
        found.append((names.get(ident, f"0x{ident:x}"), _render(stack, ident == main)))
    return tuple(found)


def _render(stack: traceback.StackSummary, main: bool) -> str:
    frames = list(stack)
    if main:  # from the user's function on
        starts = [i for i, f in enumerate(frames) if _is_worker_run(f.filename, f.name)]
        if starts:
            frames = frames[starts[-1] + 1 :]
    else:
        while frames and frames[0].filename == threading.__file__:
            frames = frames[1:]
    paused = next((i for i, f in enumerate(frames) if os.path.abspath(f.filename) in _DEBUGGER_FILES), None)
    text = "".join(traceback.format_list(frames[:paused]))
    if paused is not None:
        text += "  (paused in the debugger)\n"
    return text


_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def _is_worker_run(filename: str, name: str) -> bool:
    """The worker's frame that calls the user's function (trx_core.worker._run)."""
    return name == "_run" and os.path.abspath(filename) == _WORKER_FILE


def _frame_where(frame: types.FrameType, line: int) -> str:
    return f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"
