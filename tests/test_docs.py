"""The documentation site builds without a single warning, and what its pages show was
produced by the code while it was built: real --help output, a real log folder, and an API
reference entry for every public name."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sphinx.util.inventory import InventoryFile

import torchrunx
import trx_core
import trx_logging
import trx_remote

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML site, built as CI builds it: every warning is an error."""
    out = tmp_path_factory.mktemp("docs") / "html"
    build = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(out)]
    done = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stdout}\n{done.stderr}"
    return out


def page_text(site: Path, page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", (site / f"{page}.html").read_text()))


def test_the_site_builds_with_warnings_as_errors_and_has_every_page(site: Path) -> None:
    pages = {p.stem for p in site.glob("*.html")}
    expected = {"index", "getting-started", "examples", "launching", "cli", "logs", "environment", "failures"}
    expected |= {"multiple-machines", "executors", "embedding", "how-it-works", "api", "porting-from-torchrun"}
    expected |= {"sessions", "debugging"}
    assert expected <= pages


def test_command_line_page_shows_the_help_that_tyro_and_argparse_print_now(site: Path) -> None:
    text = page_text(site, "cli")
    assert "$ python examples/tyro_cli.py --help" in text
    assert "--heartbeat-timeout" in text and "--workers-per-host" in text  # from tyro, not pasted
    assert "usage: multihost.py [-h] [--ssh-config SSH_CONFIG]" in text  # from argparse


def test_logs_page_shows_the_files_of_a_launch_made_during_the_build(site: Path) -> None:
    text = page_text(site, "logs")
    stems = set(re.findall(r"(\d{4}-\d\d-\d\dT[\d:.]+)_localhost_1\.log", text))
    assert len(stems) == 1  # one real run, named by its start time
    (stem,) = stems
    for name in (f"{stem}_localhost.log", f"{stem}_localhost_0.log", f"{stem}_localhost_1.log"):
        assert name in text
    assert "localhost rank 1 local 1 WARNING  rank 1 found 3 corrupt samples" in text
    assert "[localhost rank 0] loading shard 0 of 2" in text  # the console
    assert '"stream": "agent"' in text  # the jsonl excerpt


def test_failures_page_shows_a_real_worker_traceback_attached_to_the_launchers_exception(site: Path) -> None:
    text = page_text(site, "failures")
    assert "--- raised in the worker: host 'localhost', rank 1 (local rank 1) ---" in text
    assert "return shards[rank]  # there is no shard for rank 1" in text


def test_embedding_page_runs_its_executor(site: Path) -> None:
    assert "{0: 0, 1: 10}" in page_text(site, "embedding")


def test_every_public_name_of_the_four_packages_has_an_api_reference_entry(site: Path) -> None:
    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {name for kind in inventory.values() for name in kind}
    for module in (torchrunx, trx_core, trx_remote, trx_logging):
        for name in module.__all__:
            # trx_core's names that torchrunx re-exports are documented once, under torchrunx
            # (and a name torchrunx re-exports from trx_logging, under trx_logging)
            aliases = {
                f"{other.__name__}.{name}"
                for other in (torchrunx, trx_core, trx_remote, trx_logging)
                if getattr(other, name, None) is getattr(module, name)
            }
            assert aliases & documented, f"{module.__name__}.{name} has no entry in the API reference"


def test_debugging_page_shows_a_recorded_session(site: Path) -> None:
    text = page_text(site, "debugging")
    assert "[localhost rank 1 local 1] (Pdb) p step, loss" in text
    assert "Press Ctrl-\\ (SIGQUIT)" in text
