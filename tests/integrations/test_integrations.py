"""The training stacks users run, under torchrunx: each example of examples/integrations/ runs as
a user runs it (``python examples/integrations/<script>.py`` in a folder of theirs) and prints
what its workers returned; the notebook runs headless in a Jupyter kernel.

These need the libraries of the ``integrations`` hatch environment
(``./dev hatch run integrations:test``); elsewhere the module is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

for _library in ("transformers", "accelerate", "lightning", "deepspeed", "nbclient", "ipykernel"):
    pytest.importorskip(_library, reason="the integrations environment: ./dev hatch run integrations:test")

import nbformat  # noqa: E402  (after the skip: nbclient brings it)
from nbclient import NotebookClient  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "integrations"
NUMBER = r"(\d+\.\d+)"


def run_example(script: str, *args: str, cwd: Path, timeout: float = 240) -> str:
    """Run an example in `cwd` with its logs in `cwd`/logs; its last line, or fail with its output."""
    env = {**os.environ, "TORCHRUNX_LOG_DIR": str(cwd / "logs")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.timeout(300)
def test_hf_trainer_trains_a_tiny_gpt2_data_parallel_on_two_workers(tmp_path: Path) -> None:
    line = run_example("hf_trainer.py", "--steps", "4", cwd=tmp_path)
    assert re.fullmatch(rf"hf_trainer: 2 workers, 4 steps, loss {NUMBER}", line), line


@pytest.mark.timeout(300)
def test_accelerate_prepares_gathers_and_lowers_the_loss_on_two_workers(tmp_path: Path) -> None:
    line = run_example("accelerate_train.py", "--steps", "12", cwd=tmp_path)
    match = re.fullmatch(rf"accelerate: 2 processes, loss {NUMBER} -> {NUMBER}", line)
    assert match, line
    assert float(match[2]) < float(match[1]) / 4


@pytest.mark.timeout(300)
def test_lightning_trainer_with_ddp_strategy_fits_on_two_workers(tmp_path: Path) -> None:
    line = run_example("lightning_train.py", "--epochs", "3", cwd=tmp_path)
    assert re.fullmatch(rf"lightning: 2 processes \(\w+\), loss {NUMBER}", line), line


@pytest.mark.timeout(400)  # the first run on a machine compiles DeepSpeed's CPU communication op
def test_deepspeed_zero_stage_1_trains_on_two_cpu_workers(tmp_path: Path) -> None:
    line = run_example("deepspeed_train.py", "--steps", "20", cwd=tmp_path, timeout=360)
    match = re.fullmatch(rf"deepspeed: 2 processes, ZeRO stage 1, loss {NUMBER} -> {NUMBER}", line)
    assert match, line
    assert float(match[2]) < float(match[1])


@pytest.mark.timeout(240)
def test_a_notebook_launches_a_function_of_its_own_from_a_cell_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHRUNX_LOG_DIR", str(tmp_path / "logs"))  # the kernel inherits it
    notebook = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    results = [
        output["data"]["text/plain"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output["output_type"] == "execute_result"
    ]
    assert results == ["{0: 30.0, 1: 30.0}", "{0: 1.5, 1: 1.5}"]
    assert any(p.name.endswith("_1.log") for p in (tmp_path / "logs").iterdir())
