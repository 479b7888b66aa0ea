"""Directives that run code while the documentation is built, so what a page shows is what
the installed packages really do.

``program-output``
    Runs a command from the repository root and shows its output. ``python`` as the first
    word means the interpreter running Sphinx (the development environment)::

        ```{program-output} python examples/tyro_cli.py --help
        ```

``log-example``
    Shows part of a real log folder, made once per build by running ``docs/log_example.py``
    (a small launch) into a temporary folder. The argument is ``tree`` (the folder's files),
    ``console`` (what the launcher printed), or the end of a file's name (``localhost_1.log``;
    the start time differs every build). ``:match:`` keeps the lines matching a regular
    expression, ``:max-lines:`` the first N::

        ```{log-example} localhost.log
        :max-lines: 5
        ```

``message-table``
    The table of every protocol message, made from ``trx_core.protocol`` by
    ``message_table()``, so that the page cannot drift from the code::

        ```{message-table}
        ```

A failing command fails the build, with its output in the error.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]
LOG_EXAMPLE_SCRIPT = ROOT / "docs" / "log_example.py"
_TIMEOUT_S = 180
_COLUMNS = "100"  # the width help texts are wrapped to, to fit the page


class CommandFailed(Exception):
    pass


def run(argv: list[str], extra_env: dict[str, str] | None = None) -> str:
    """Run `argv` in the repository root; its standard output (stderr appended), or `CommandFailed`."""
    if argv and argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    # Help texts are wrapped to the terminal width and coloured for terminals: fix both.
    env = {**os.environ, "COLUMNS": _COLUMNS, "NO_COLOR": "1", "TERM": "dumb", **(extra_env or {})}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S)
    if done.returncode != 0:
        raise CommandFailed(f"{shlex.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


class ProgramOutput(SphinxDirective):
    """The output of a command, with the command above it as a shell prompt line."""

    required_arguments = 1
    final_argument_whitespace = True
    option_spec: ClassVar[dict[str, Any]] = {"no-prompt": directives.flag}

    def run(self) -> list[nodes.Node]:
        command = self.arguments[0]
        argv = shlex.split(command)
        for word in argv:
            if (ROOT / word).is_file():  # rebuild this page when a script it runs changes
                self.env.note_dependency(str(ROOT / word))
        try:
            output = run(argv)
        except (CommandFailed, OSError, subprocess.TimeoutExpired) as e:
            raise self.error(f"program-output: {e}") from e
        text = output.rstrip() if "no-prompt" in self.options else f"$ {command}\n{output.rstrip()}"
        block = nodes.literal_block(text, text, language="text")
        self.set_source_info(block)
        return [block]


def log_example_folder(app: Sphinx) -> Path:
    """The folder ``docs/log_example.py`` filled for this build (made on first use)."""
    folder: Path | None = getattr(app, "_trx_log_example", None)
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="trx-docs-logs-")
        app.connect("build-finished", lambda app, exception: tmp.cleanup())
        folder = Path(tmp.name)
        console = run(["python", str(LOG_EXAMPLE_SCRIPT), str(folder)], {"TORCHRUNX_LOG_LEVEL": "INFO"})
        (folder / "console.txt").write_text(console)
        app._trx_log_example = folder  # type: ignore[attr-defined]
    return folder


def tree(folder: Path, name: str) -> str:
    """``name/`` and the files under it, drawn as ``tree`` draws them."""
    files = sorted(p.name for p in folder.iterdir())
    lines = [f"{name}/"]
    for i, file in enumerate(files):
        lines.append(("└── " if i == len(files) - 1 else "├── ") + file)
    return "\n".join(lines)


class LogExample(SphinxDirective):
    """A part of the log folder of a real launch (see the module docstring)."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {"match": directives.unchanged, "max-lines": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(LOG_EXAMPLE_SCRIPT))
        what = self.arguments[0]
        try:
            folder = log_example_folder(self.env.app)
        except (CommandFailed, OSError, subprocess.TimeoutExpired) as e:
            raise self.error(f"log-example: {e}") from e
        logs = folder / "torchrunx_logs"
        if what == "tree":
            text = tree(logs, logs.name)
        elif what == "console":
            text = (folder / "console.txt").read_text()
        else:
            matches = sorted(p for sub in (logs, folder / "jsonl_logs") for p in sub.iterdir() if p.name.endswith(what))
            if len(matches) != 1:
                raise self.error(f"log-example: {len(matches)} files end with {what!r} in {folder}")
            text = matches[0].read_text()
        lines = text.rstrip("\n").splitlines()
        if "match" in self.options:
            lines = [line for line in lines if re.search(self.options["match"], line)]
        if "max-lines" in self.options:
            lines = lines[: self.options["max-lines"]]
        if not lines:
            raise self.error(f"log-example: nothing to show for {what!r} with {self.options}")
        body = "\n".join(lines)
        block = nodes.literal_block(body, body, language="text")
        self.set_source_info(block)
        return [block]


class MessageTable(SphinxDirective):
    """The protocol's messages as a table, from the installed ``trx_core.protocol``."""

    def run(self) -> list[nodes.Node]:
        from trx_core import protocol

        self.env.note_dependency(str(protocol.__file__))
        container = nodes.container()
        self.state.nested_parse(protocol.message_table().splitlines(), self.content_offset, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("message-table", MessageTable)
    app.add_directive("program-output", ProgramOutput)
    app.add_directive("log-example", LogExample)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
