"""What training libraries expect of a torchrun worker, checked in ours (issue 10): Lightning
recognises a torchelastic launch, accelerate's settings reach the workers, a process group can
be destroyed and initialised again, a worker's own subprocesses get OMP_NUM_THREADS, and each
Lightning log line is written once.

These need the libraries of the ``integrations`` hatch environment
(``./dev hatch run integrations:test``); elsewhere the module is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

for _library in ("lightning", "accelerate"):
    pytest.importorskip(_library, reason="the integrations environment: ./dev hatch run integrations:test")

import torchrunx as trx  # noqa: E402


def two_workers(tmp_path: Path, **fields: Any) -> dict[str, Any]:
    return {"hostnames": ["localhost"], "workers_per_host": 2, "logs": tmp_path / "logs", "timeout": 60, **fields}


# --------------------------------------------------------------------------- worker functions
def lightning_trainer(devices: int, fit: bool, root_dir: str) -> str:
    """Build (and with `fit`, fit) a Lightning DDP trainer; the cluster environment it chose."""
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp",
        max_epochs=1,
        default_root_dir=root_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if fit:
        trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4))
    return type(trainer.strategy.cluster_environment).__name__


def destroy_then_init_again() -> float:
    import torch
    import torch.distributed as dist

    dist.destroy_process_group()
    dist.init_process_group("gloo")  # env://, as a library re-creating its group does
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return total.item()


def accelerate_settings() -> tuple[str | None, int, str]:
    from accelerate import Accelerator

    accelerator = Accelerator()
    return os.environ.get("ACCELERATE_USE_CPU"), accelerator.num_processes, accelerator.device.type


def omp_num_threads_of_a_child() -> str:
    code = "import os; print(os.environ.get('OMP_NUM_THREADS'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# --------------------------------------------------------------------------- tests
@pytest.mark.timeout(180)
def test_lightning_chooses_its_torchelastic_environment(tmp_path: Path) -> None:
    results = trx.launch(
        lightning_trainer,
        {"devices": 2, "fit": False, "root_dir": str(tmp_path)},
        **two_workers(tmp_path, backend=None),
    )
    assert dict(results) == {0: "TorchElasticEnvironment", 1: "TorchElasticEnvironment"}


@pytest.mark.timeout(180)
def test_lightning_gives_its_own_error_for_a_wrong_devices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"You set `devices=3` .* does not match the world size \(2\)"):
        trx.launch(
            lightning_trainer,
            {"devices": 3, "fit": True, "root_dir": str(tmp_path)},
            **two_workers(tmp_path, backend=None, hang_timeout=20),  # a rank that waits for a third fails fast
        )


@pytest.mark.timeout(180)
def test_each_lightning_log_line_is_written_once(tmp_path: Path) -> None:
    trx.launch(
        lightning_trainer, {"devices": 2, "fit": True, "root_dir": str(tmp_path)}, **two_workers(tmp_path, backend=None)
    )
    (rank0_log,) = (tmp_path / "logs").glob("*_0.log")
    text = rank0_log.read_text()
    assert text.count("Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2") == 1, text
    assert text.count("`Trainer.fit` stopped: `max_epochs=1` reached.") == 1, text


@pytest.mark.timeout(120)
def test_a_process_group_can_be_destroyed_and_initialised_again(tmp_path: Path) -> None:
    results = trx.launch(destroy_then_init_again, **two_workers(tmp_path, backend="gloo"))
    assert dict(results) == {0: 3.0, 1: 3.0}


@pytest.mark.timeout(120)
def test_accelerate_use_cpu_set_in_the_launcher_reaches_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    results = trx.launch(accelerate_settings, **two_workers(tmp_path, backend=None))
    assert dict(results) == {0: ("true", 2, "cpu"), 1: ("true", 2, "cpu")}


@pytest.mark.timeout(120)
def test_a_workers_own_subprocess_gets_omp_num_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    results = trx.launch(omp_num_threads_of_a_child, **two_workers(tmp_path, backend=None))
    for value in results.values():
        assert value.isdigit() and int(value) >= 1, value
