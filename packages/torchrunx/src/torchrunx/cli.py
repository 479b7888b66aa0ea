"""The ``torchrunx`` command: run an unchanged torchrun-style script on every worker.

    torchrunx [launcher flags] script.py [script args]
    torchrunx [launcher flags] -m module [module args]
    python -m torchrunx ...

Everything before the script (or ``-m module``, or ``--``) is ours: the `Launcher` fields as
tyro flags, plus torchrun's common spellings where they map. Everything after is the script's.
Each worker runs the script as ``__main__`` with ``sys.argv = [script, *args]``; the command
exits with the script's exit code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import runpy
import signal
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

from trx_core import ConfigurationError, Launcher, WorkerFailedError

__all__ = ["Command", "UsageError", "main", "parse", "run_script"]

_EXIT_USAGE = 2  # as argparse (and torchrun) exit on a bad command line
_EXIT_INTERRUPTED = 130  # as a shell reports a program ended by Ctrl-C

_DESCRIPTION = """\
Run an unchanged torchrun-style script on every worker of one or many hosts.

  torchrunx [OPTIONS] script.py [SCRIPT ARGS]
  torchrunx [OPTIONS] -m module [MODULE ARGS]
  torchrunx [OPTIONS] -- script [SCRIPT ARGS]"""

_EPILOG = """\
Options come before the script; every word after it is the script's (put -- before a script
whose name does not end in .py). Each worker runs the script as __main__ with sys.argv set to
[script, *SCRIPT ARGS] and RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT... in its
environment, so a script that calls init_process_group() itself works unchanged: that is why
--backend defaults to None here. The command exits with the script's exit code (that of the
first worker to fail), 1 if a worker raised an exception, 2 for a bad command line.

torchrun's spellings (underscores also accepted):
  --nproc-per-node N     same as --workers-per-host N (also gpu, cpu, auto)
  --nnodes N             accepted when it agrees with the number of --hostnames
  --standalone           accepted; has no effect (every run has its own rendezvous)
  -m, --module           run the script argument as a module (python -m)
  --master-addr, --master-port, --rdzv-backend, --rdzv-endpoint, --rdzv-id, --rdzv-conf,
  --local-addr, --node-rank, --max-restarts
                         refused, with what to do instead (torchrunx starts every host itself)"""

_START_ALL_HOSTS = (
    "torchrunx starts the agents of all hosts from this one command: list them with "
    "--hostnames node1 node2 (and --ssh-config-file if needed) and run it once, on one machine"
)
_REFUSED = {
    "--master-addr": "the rendezvous is hosted by this command, which tells every worker its "
    "MASTER_ADDR and MASTER_PORT; to choose the address workers reach it at, use --launcher-address",
    "--master-port": "the rendezvous port is chosen free by this command and given to every worker as MASTER_PORT",
    "--rdzv-backend": "the rendezvous is hosted by this command; there is nothing to configure",
    "--rdzv-endpoint": "the rendezvous is hosted by this command; to choose the address workers reach it at, "
    "use --launcher-address",
    "--rdzv-id": "every run has its own rendezvous; there is nothing to configure",
    "--rdzv-conf": "the rendezvous is hosted by this command; there is nothing to configure",
    "--local-addr": "use --launcher-address for the address at which workers reach this machine",
    "--node-rank": _START_ALL_HOSTS,
    "--max-restarts": "torchrunx does not restart workers: a failed run stops every worker and exits non-zero; "
    "run the command again (or call torchrunx.launch() in a retry loop)",
}
_TORCHRUN_VALUE_FLAGS = ("--nproc-per-node", "--nnodes")
_MODULE_FLAGS = ("-m", "--module")


class UsageError(Exception):
    """The command line cannot be run; the message says what to write instead."""


@dataclass
class Command:
    """A command line split into the launcher's flags (tyro form) and the script to run."""

    launcher_args: list[str]
    """The Launcher's flags, torchrun's spellings translated."""
    target: str
    """The script's path, or the module's name with ``module``."""
    script_args: list[str] = field(default_factory=list)
    module: bool = False
    nnodes: int | None = None
    """torchrun's ``--nnodes``, to be checked against the hosts."""


def parse(argv: Sequence[str]) -> Command | None:
    """Split a command line (without the program name) at the script; None when help is asked.

    A flag that takes several values (``--hostnames a b``) takes words up to the next flag, or
    up to a word ending in ``.py``: the script. Raises `UsageError` for torchrun flags that
    have no equivalent here and for a command line without a script.
    """
    takes_many = _launcher_flags()
    launcher_args: list[str] = []
    module = False
    nnodes: int | None = None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return _with_target(argv[i + 1 :], launcher_args, module, nnodes)
        if word in ("-h", "--help"):
            return None
        if word in _MODULE_FLAGS:
            module = True
            i += 1
            continue
        if not word.startswith("-") or word == "-":
            return _with_target(argv[i:], launcher_args, module, nnodes)
        name, has_value, value = word.partition("=")
        # Flags are spelled with hyphens; torchrun's documentation also spells them with underscores.
        name = name[:2] + name[2:].replace("_", "-") if name.startswith("--") else name
        if name in _REFUSED:
            raise UsageError(f"{name} is not supported: {_REFUSED[name]}")
        if name == "--standalone":
            i += 1
            continue
        if not has_value and name in (*_TORCHRUN_VALUE_FLAGS, *takes_many) and i + 1 < len(argv):
            if takes_many.get(name, False):
                count = 0
                while i + 1 + count < len(argv) and _is_list_value(name, argv[i + 1 + count]):
                    count += 1
                if count == 0 and not argv[i + 1].startswith("-"):
                    count = 1  # a wrong value (--workers-per-host two): tyro says what is wrong with it
                values = list(argv[i + 1 : i + 1 + count])
            else:
                values = [argv[i + 1]]
                count = 1
            i += 1 + count
        else:
            values = [value] if has_value else []
            i += 1
        if name == "--nproc-per-node":
            launcher_args += ["--workers-per-host", *values]
        elif name == "--nnodes":
            nnodes = _parse_nnodes(values)
        else:
            launcher_args += [name, *values]
    raise UsageError("no script given: torchrunx [OPTIONS] script.py [SCRIPT ARGS] (see torchrunx --help)")


def _with_target(rest: Sequence[str], launcher_args: list[str], module: bool, nnodes: int | None) -> Command:
    if not rest:
        raise UsageError(f"no {'module' if module else 'script'} given after the options (see torchrunx --help)")
    return Command(launcher_args, rest[0], list(rest[1:]), module, nnodes)


def _launcher_flags() -> dict[str, bool]:
    """Each Launcher flag (tyro spelling) -> whether it takes several values (a list, tuple or dict field)."""
    hints = typing.get_type_hints(Launcher)
    return {
        "--" + f.name.replace("_", "-"): any(
            typing.get_origin(t) in (list, tuple, dict) for t in (*typing.get_args(hints[f.name]), hints[f.name])
        )
        for f in fields(Launcher)
    }


def _is_list_value(flag: str, word: str) -> bool:
    if word.startswith("-") or word.endswith(".py"):
        return False
    if flag == "--workers-per-host":  # numbers, or one of the words: the script can follow without a `--`
        return word.isdigit() or word in ("auto", "gpu", "cpu")
    return True


def _parse_nnodes(values: list[str]) -> int:
    text = values[0] if values else ""
    if ":" in text:
        raise UsageError(
            f"--nnodes {text}: elastic ranges of hosts are not supported; every host listed in --hostnames takes part"
        )
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--nnodes needs a positive number of hosts, got {text!r}")
    return int(text)


def _check_nnodes(nnodes: int, hostnames: object) -> None:
    if isinstance(hostnames, (list, tuple)):
        count: int | None = len(hostnames)
    elif hostnames == "auto" and "SLURM_JOB_NODELIST" not in os.environ:
        count = 1
    else:  # the SLURM allocation, whose size SLURM tells
        count = int(os.environ["SLURM_JOB_NUM_NODES"]) if os.environ.get("SLURM_JOB_NUM_NODES", "").isdigit() else None
    if count is not None and count != nnodes:
        raise UsageError(
            f"--nnodes {nnodes} but the hosts are {hostnames!r} ({count} host{'s' * (count != 1)}): "
            f"{_START_ALL_HOSTS}; --nnodes may then be left out"
        )


def run_script(target: str, script_args: Sequence[str], module: bool = False) -> int:
    """Run a script (or ``module``) as ``__main__`` in this worker, as ``python`` would; return 0.

    ``sys.argv`` is ``[target, *script_args]`` and ``sys.path[0]`` the script's folder (the
    current folder for a module). While the script runs it is ``sys.modules["__main__"]``, so
    objects defined in it pickle by reference and spawned children re-import it. A non-zero
    ``sys.exit()`` propagates: this worker exits with that code and the run stops its peers,
    as torchrun does when a worker fails.
    """
    sys.argv = [target, *script_args]
    if module:
        sys.path.insert(0, os.getcwd())
        runner: Callable[[], object] = functools.partial(runpy.run_module, target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runner = functools.partial(runpy.run_path, target, run_name="__main__")
    try:
        runner()
    except SystemExit as e:
        if e.code is None or e.code == 0:
            return 0
        raise  # the worker reports it (WorkerExitError) and the run stops the other workers
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code (the script's, or ours for a failure of the run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parse(argv)
    except UsageError as e:
        return _usage_error(str(e))
    if command is None:
        _print_help()
        return 0
    launcher = _build_launcher(command.launcher_args)
    try:
        if command.nnodes is not None:
            _check_nnodes(command.nnodes, launcher.hostnames)
        if not command.module and not os.path.isfile(command.target):
            raise UsageError(f"can't open file {command.target!r}: no such file")
    except UsageError as e:
        return _usage_error(str(e))
    return _run(launcher, command)


def _build_launcher(launcher_args: list[str]) -> Launcher:
    import tyro  # only the launcher needs it, not the workers that import run_script

    return tyro.cli(
        Launcher,
        prog="torchrunx",
        description=_DESCRIPTION,
        args=launcher_args,
        default=Launcher(backend=None),  # the script initialises its own process group
    )


def _print_help() -> None:
    with contextlib.suppress(SystemExit):  # tyro prints the flags' help, then exits
        _build_launcher(["--help"])
    print(f"\n{_EPILOG}")


def _run(launcher: Launcher, command: Command) -> int:
    try:
        launcher.run(
            run_script, {"target": command.target, "script_args": command.script_args, "module": command.module}
        )
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    except ConfigurationError as e:
        return _usage_error(str(e))
    except WorkerFailedError as e:
        print(f"torchrunx: {e}", file=sys.stderr)
        return _exit_code(e.how)
    except Exception as e:
        if (code := _signal_exit_code(getattr(e, "signal", None))) is not None:  # the run was stopped by a signal
            print(f"torchrunx: {e}", file=sys.stderr)
            return code
        # The worker's traceback is attached as a note (Python >= 3.11) or as the cause.
        text = "".join(traceback.format_exception_only(type(e), e))
        if sys.version_info < (3, 11) and e.__cause__ is not None:
            text += f"{e.__cause__}\n"
        print(f"torchrunx: {text}", end="", file=sys.stderr)
        return 1
    return 0


def _exit_code(how: str) -> int:
    """The command's exit code for a worker that ended as `how` says: its own exit code, or
    128 + the signal's number as a shell reports a program killed by a signal."""
    if match := re.fullmatch(r"exit code (-?\d+)", how):
        code = int(match.group(1))
        return code if 0 < code < 256 else 1
    if match := re.fullmatch(r"killed by signal (\w+)", how):
        return _signal_exit_code(match.group(1)) or 1
    return 1


def _signal_exit_code(name: object) -> int | None:
    """128 + the number of the signal called `name` (e.g. "SIGTERM"), as a shell reports it."""
    try:
        return 128 + signal.Signals[name].value if isinstance(name, str) else None
    except KeyError:
        return None


def _usage_error(message: str) -> int:
    print(f"torchrunx: error: {message}", file=sys.stderr)
    return _EXIT_USAGE
