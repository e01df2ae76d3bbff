"""One way of recording a model: built by the CLI or in Python, a TransferModule saves the same hyperparameters,
every component as its class_path/init_args (``**kwargs`` forwarded to a parent included), and reloads from them."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_transfer._config import build_component
from lightning_transfer.cli import TransferCLI
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.lora import LoRA
from lightning_transfer.test_time.base import TestTimeAdaptation
from lightning_transfer.test_time.tent import Tent
from tests.conftest import REPO
from tests.helpers.models import TINY_VIT, pretrained_file


class LoRAWithDefaults(LoRA):
    """A user's strategy that forwards its options to its parent through **kwargs."""

    def __init__(self, note: str = "mine", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.note = note


class FastTent(Tent):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


def _save(module: TransferModule, path) -> None:
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=2, batch_size=5))
    trainer.save_checkpoint(path)


def test_the_cli_and_python_record_the_same_model_and_both_reload(tmp_path):
    weights = pretrained_file(TINY_VIT, "hparams_vit")
    backbone_args = ["--model.backbone=TimmBackbone", "--model.backbone.model_name=test_vit",
                     '--model.backbone.model_kwargs={"img_size": 8, "patch_size": 2, "in_chans": 1}',
                     '--model.backbone.data_config={"mean": [0.3], "std": [0.35]}',
                     f"--model.backbone.checkpoint_path={weights}"]
    cli = TransferCLI(args=[*backbone_args, "--config", str(REPO / "configs/data/digits_target.yaml"),
                            f"--model.adaptation={__name__}.LoRAWithDefaults", "--model.adaptation.r=2",
                            "--model.adaptation.note=cli", "--model.head_dropout=0.1", "--trainer.logger=false"],
                      run=False)
    from lightning_transfer.backbones import TimmBackbone

    python = TransferModule(TimmBackbone(**TINY_VIT, checkpoint_path=weights), LoRAWithDefaults(note="cli", r=2),
                            num_classes=5, class_names=["5", "6", "7", "8", "9"], head_dropout=0.1)
    assert dict(cli.model.hparams) == dict(python.hparams)
    assert python.hparams["adaptation"]["init_args"]["r"] == 2  # through **kwargs
    assert python.hparams["adaptation"]["init_args"]["note"] == "cli"
    for name, module in (("cli", cli.model), ("python", python)):
        path = tmp_path / f"{name}.ckpt"
        _save(module, path)
        loaded = TransferModule.load_from_checkpoint(path, weights_only=True)
        assert dict(loaded.hparams) == dict(python.hparams), name
        assert type(loaded.adaptation) is LoRAWithDefaults and loaded.adaptation.r == 2
        assert loaded.adaptation.note == "cli" and loaded.head.dropout_rate == 0.1
        for key, value in module.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), (name, key)


def test_a_test_time_subclass_forwarding_kwargs_rebuilds_with_them():
    method = FastTent(lr=0.01, steps=2)
    config = method.init_config()
    assert config["init_args"]["lr"] == 0.01 and config["init_args"]["steps"] == 2
    rebuilt = build_component(config, TestTimeAdaptation)
    assert type(rebuilt) is FastTent and rebuilt.init_config() == config


def test_a_recorded_class_must_be_of_the_expected_family():
    import pytest

    with pytest.raises(TypeError, match="is not a TestTimeAdaptation"):
        build_component({"class_path": "lightning_transfer.strategies.lora.LoRA", "init_args": {}}, TestTimeAdaptation)
    with pytest.raises(TypeError, match="is not a TestTimeAdaptation"):
        build_component({"class_path": "os.system", "init_args": {"command": "true"}}, TestTimeAdaptation)
