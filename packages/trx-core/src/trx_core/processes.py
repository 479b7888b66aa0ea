"""Linux process plumbing: parent-death signals, subreaping, and the one way to kill what a run started.

`kill_descendants` kills a process's own tree (the agent's teardown); `kill_session` kills
every process of a session and every process marked with a variable in its environment
(what an executor uses once an agent is gone, since processes that left the session, e.g. a
worker's child that called ``setsid``, still carry the mark).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _libc = None


def _prctl(option: int, value: int) -> None:
    if _libc is not None:
        _libc.prctl(option, value, 0, 0, 0)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent thread exits."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init, so we can kill them."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (empty if it is gone)."""
    result: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                result.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return result


def descendants(pid: int) -> list[int]:
    """All descendants of `pid`, parents before children."""
    found: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children(child))
    return found


def kill_descendants(deadline_s: float = 3.0, keep: frozenset[int] = frozenset()) -> None:
    """SIGKILL every descendant of this process but the children in `keep` (and theirs), and
    reap them all (needs `become_subreaper`)."""
    end = time.monotonic() + deadline_s
    while True:
        kept = {pid for child in keep for pid in (child, *descendants(child))}
        pids = [pid for pid in descendants(os.getpid()) if pid not in kept]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap_children()
        if not pids or time.monotonic() > end:
            return
        time.sleep(0.005)


def _session_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])  # field 6 of stat: the session id
    except (OSError, IndexError, ValueError):
        return None


def _has_mark(pid: str, mark: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return mark in f.read().split(b"\0")
    except OSError:
        return False


def kill_session(sid: int | None, mark: tuple[str, str] | None = None, wait_s: float = 2.0) -> list[int]:
    """SIGKILL every process of session `sid`, and every process whose environment holds
    ``NAME=VALUE`` for ``mark = (NAME, VALUE)``. Returns the pids signalled, once they are gone
    (or after `wait_s`: a process in uninterruptible sleep dies when it wakes)."""
    needle = f"{mark[0]}={mark[1]}".encode() if mark else None
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if (sid is not None and _session_of(entry) == sid) or (needle is not None and _has_mark(entry, needle)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    end = time.monotonic() + wait_s
    while any(_running(pid) for pid in killed) and time.monotonic() < end:
        time.sleep(0.005)
    return killed


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has released everything; only its parent's wait is due)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def leave_signals_to_the_main_thread() -> None:
    """Block every signal in the calling (helper) thread, so that signals sent to the process
    reach the main thread. CPython runs Python signal handlers there, but a signal the kernel
    hands to another thread may not wake the main thread's interpreter until much later."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def identity(pid: int) -> str | None:
    """``PID:START_TIME`` of a process: names it uniquely on this machine since boot (a pid alone
    may be reused). None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]  # field 22 of stat: start time in ticks
    except (OSError, IndexError):
        return None
    return f"{pid}:{start}"


def started_at(pid: int) -> float:
    """When process `pid` started, as ``time.time()`` (to a clock tick; 0.0 if unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # since boot
    except (OSError, ValueError, IndexError):
        return 0.0
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def resident_memory(pid: int) -> int:
    """The resident set size of process `pid` in bytes (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def reap_children() -> dict[int, int]:
    """Reap every child that has exited; return their raw wait statuses by pid."""
    statuses: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if pid == 0:
            return statuses
        statuses[pid] = status


def describe_wait_status(status: int) -> str:
    """E.g. ``exit code 3`` or ``killed by signal SIGKILL``."""
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal_name(os.WTERMSIG(status))}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
