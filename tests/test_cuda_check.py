"""Without a GPU, TransferModule clears Lightning's NVML-based CUDA check flag, which every Adam step paid for."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_transfer.cuda_check import NVML_CHECK_VARIABLE, skip_nvml_check_without_gpus
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import LinearProbe
from tests.helpers.models import tiny_vit


@pytest.fixture
def cuda_build_without_gpus(monkeypatch):
    monkeypatch.setenv(NVML_CHECK_VARIABLE, "1")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    return monkeypatch


def test_the_flag_is_cleared_where_torch_has_cuda_but_sees_no_gpu(cuda_build_without_gpus):
    assert skip_nvml_check_without_gpus() is True
    assert NVML_CHECK_VARIABLE not in os.environ
    assert skip_nvml_check_without_gpus() is False  # nothing left to do


def test_the_flag_is_kept_where_a_gpu_is_visible(cuda_build_without_gpus):
    cuda_build_without_gpus.setattr(torch.cuda, "device_count", lambda: 1)
    assert skip_nvml_check_without_gpus() is False
    assert os.environ[NVML_CHECK_VARIABLE] == "1"


def test_the_flag_is_kept_for_a_cpu_only_build_and_for_a_value_lightning_did_not_set(cuda_build_without_gpus):
    cuda_build_without_gpus.setattr(torch.backends.cuda, "is_built", lambda: False)
    assert skip_nvml_check_without_gpus() is False
    assert os.environ[NVML_CHECK_VARIABLE] == "1"
    cuda_build_without_gpus.setattr(torch.backends.cuda, "is_built", lambda: True)
    cuda_build_without_gpus.setenv(NVML_CHECK_VARIABLE, "0")
    assert skip_nvml_check_without_gpus() is False
    assert os.environ[NVML_CHECK_VARIABLE] == "0"


class _FlagDuringSteps(Callback):
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(os.environ.get(NVML_CHECK_VARIABLE))


@pytest.mark.skipif(not torch.backends.cuda.is_built() or torch.cuda.device_count() > 0,
                    reason="needs a CUDA build of torch on a machine with no GPU")
def test_training_steps_run_without_the_flag_on_a_machine_with_no_gpu(monkeypatch):
    monkeypatch.setenv(NVML_CHECK_VARIABLE, "1")  # as importing Lightning leaves it
    probe = _FlagDuringSteps()
    Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", callbacks=[probe]).fit(
        TransferModule(tiny_vit(), LinearProbe(), num_classes=5),
        datamodule=Digits(task="target", num_shots=2, batch_size=5))
    assert probe.seen == [None, None]
