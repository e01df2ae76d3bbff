"""export: what it writes loads back as the trained model; a file that is no checkpoint is named before anything is
written."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from lightning_transfer.backbones.timm import TimmBackbone
from lightning_transfer.datamodules import Digits
from lightning_transfer.export import export_checkpoint
from lightning_transfer.heads import LinearHead
from lightning_transfer.module import TransferModule
from lightning_transfer.registry import STRATEGIES
from tests.helpers.models import TINY_VIT, tiny_vit


@pytest.fixture
def lora_checkpoint(tmp_path) -> tuple[str, TransferModule]:
    module = TransferModule(tiny_vit(), STRATEGIES.get("lora")(r=4), num_classes=5)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=tmp_path, limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=2, batch_size=5))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return str(path), module.eval()


def test_a_merged_export_loads_back_as_the_trained_model(lora_checkpoint, tmp_path):
    path, module = lora_checkpoint
    export_checkpoint(path, "merged", str(tmp_path / "out"))
    backbone = TimmBackbone(**TINY_VIT, checkpoint_path=str(tmp_path / "out" / "backbone.safetensors")).eval()
    head = LinearHead(backbone.num_features, 5).eval()
    head.load_state_dict(load_file(tmp_path / "out" / "head.safetensors"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(head(backbone(x)), module(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["truncated", "not_torch", "state_dict"])
def test_a_file_that_is_no_checkpoint_is_named_and_nothing_is_written(lora_checkpoint, tmp_path, kind):
    path, _ = lora_checkpoint
    bad = tmp_path / "bad.ckpt"
    if kind == "truncated":  # a copy cut short, as a kill during a copy leaves it
        data = open(path, "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "not_torch":
        bad.write_text("not a checkpoint")
    else:  # a plain state dict saved with torch.save, not a fit checkpoint
        torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="bad.ckpt") as err:
        export_checkpoint(str(bad), "merged", str(tmp_path / "out"))
    assert "written by fit" in str(err.value)
    assert not (tmp_path / "out").exists()
