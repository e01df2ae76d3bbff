"""A checkpoint that lacks tensors the model trains is named as such, not blamed on the frozen backbone."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transfer.datamodules import Digits
from lightning_transfer.module import CheckpointMismatch, TransferModule
from lightning_transfer.registry import STRATEGIES
from tests.helpers.models import tiny_cnn, tiny_vit


def _checkpoint(tmp_path, module: TransferModule) -> dict:
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=tmp_path, limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=2, batch_size=5))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    return torch.load(tmp_path / "run.ckpt", weights_only=True)


@pytest.mark.parametrize("lost", ["lora_A", "head.fc.bias"])
def test_a_checkpoint_without_a_trained_tensor_names_it(tmp_path, lost):
    checkpoint = _checkpoint(tmp_path, TransferModule(tiny_vit(), STRATEGIES.get("lora")(r=2), num_classes=5))
    key = next(k for k in checkpoint["state_dict"] if lost in k)
    del checkpoint["state_dict"][key]  # edited, or written by something else than fit
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointMismatch, match="lacks 1 tensors this model trains") as err:
        TransferModule.load_from_checkpoint(tmp_path / "edited.ckpt", weights_only=True)
    assert key in str(err.value) and "frozen backbone" not in str(err.value)


def test_trained_batch_norm_statistics_still_reload(tmp_path):
    # BatchNorm statistics are kept only when training changed them: their absence is not a lacking tensor
    _checkpoint(tmp_path, TransferModule(tiny_cnn(), STRATEGIES.get("bitfit")(), num_classes=5))
    module = TransferModule.load_from_checkpoint(tmp_path / "run.ckpt", weights_only=True)
    assert isinstance(module, TransferModule)
