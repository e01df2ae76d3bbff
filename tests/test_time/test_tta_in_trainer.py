"""The model.test_time slot inside Lightning: inference-mode guard, reset between test dataloaders,
per-dataloader metrics, and CAFA statistics travelling in the checkpoint."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.test_time.cafa import CAFA
from lightning_transfer.test_time.tent import Tent
from tests.helpers.models import tiny_cnn

NUM_CLASSES = 5


def _tensors(seed: int, n: int, shift: float) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g) * (1 + shift) + shift, torch.arange(n) % NUM_CLASSES)


class _Data(LightningDataModule):
    def __init__(self, test_sets: list[TensorDataset], with_train: bool = True) -> None:
        super().__init__()
        self.test_sets, self.with_train = test_sets, with_train

    def train_dataloader(self):
        if not self.with_train:
            raise RuntimeError("no training split here")
        return DataLoader(_tensors(0, 30, 0.0), batch_size=10)

    def test_dataloader(self):
        loaders = [DataLoader(d, batch_size=10) for d in self.test_sets]
        return loaders if len(loaders) > 1 else loaders[0]


def _trainer(**kw) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kw)


def _module(test_time) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule(tiny_cnn(), FullFinetune(), num_classes=NUM_CLASSES, test_time=test_time)


def test_inference_mode_on_fails_clearly():
    with pytest.raises(RuntimeError, match="inference_mode=false"):
        _trainer(inference_mode=True).test(_module(Tent()), datamodule=_Data([_tensors(1, 20, 0.5)]))


def test_reset_between_dataloaders_and_metrics_per_dataloader():
    first, second = _tensors(1, 30, 0.5), _tensors(2, 30, 1.0)
    both = _trainer(inference_mode=False).test(_module(Tent()), datamodule=_Data([first, second]), verbose=False)
    alone = _trainer(inference_mode=False).test(_module(Tent()), datamodule=_Data([second]), verbose=False)
    assert len(both) == 2 and "test/acc/dataloader_idx_1" in both[1]
    # reset before the second dataloader: the same numbers as adapting on it from the start
    assert both[1]["test/acc/dataloader_idx_1"] == pytest.approx(alone[0]["test/acc"], abs=1e-6)
    assert both[1]["test/ece/dataloader_idx_1"] == pytest.approx(alone[0]["test/ece"], abs=1e-5)
    online = _trainer(inference_mode=False).test(_module(Tent(reset_between_dataloaders=False)),
                                                 datamodule=_Data([first, second]), verbose=False)
    assert online[1]["test/ece/dataloader_idx_1"] != pytest.approx(alone[0]["test/ece"], abs=1e-5)


def test_cafa_statistics_travel_in_the_checkpoint(tmp_path):
    target = _tensors(3, 30, 0.7)
    module = _module(CAFA())
    trainer = _trainer(inference_mode=False)
    trainer.test(module, datamodule=_Data([target]), verbose=False)
    assert module.test_time.has_statistics
    path = tmp_path / "with_stats.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert saved["test_time.class_means"].shape == (NUM_CLASSES, module.backbone.num_features)
    # a fresh run elsewhere: no source data, statistics from the checkpoint only (the method is chosen at test time)
    fresh = TransferModule.load_from_checkpoint(path, weights_only=True, test_time=CAFA())
    torch.testing.assert_close(fresh.test_time.class_covariances, module.test_time.class_covariances)
    result = _trainer(inference_mode=False).test(fresh, datamodule=_Data([target], with_train=False), verbose=False)
    assert 0.0 <= result[0]["test/acc"] <= 1.0
    with pytest.raises(ValueError, match="source class statistics"):  # and without them it would have needed data
        _trainer(inference_mode=False).test(_module(CAFA()), datamodule=None,
                                            dataloaders=DataLoader(target, batch_size=10), verbose=False)


def test_checkpoint_without_test_time_state_loads_into_a_model_with_one(tmp_path):
    module = _module(None)
    trainer = _trainer(inference_mode=False)
    trainer.test(module, datamodule=_Data([_tensors(4, 20, 0.0)]), verbose=False)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    with_cafa = _module(CAFA())
    with_cafa.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=False)
    checkpoint = torch.load(path, weights_only=True)
    with_cafa.on_load_checkpoint(checkpoint)  # the module's own check accepts the missing CAFA buffers
    with_cafa.load_state_dict(checkpoint["state_dict"], strict=True)
    assert not with_cafa.test_time.has_statistics


def test_a_second_test_in_one_process_starts_from_the_source_model():
    target = _tensors(3, 30, 0.7)
    module = _module(Tent())
    source = {k: v.clone() for k, v in module.state_dict().items()}
    first = _trainer(inference_mode=False).test(module, datamodule=_Data([target]), verbose=False)
    after = module.state_dict()
    for key, value in source.items():  # handed back unadapted: a checkpoint saved now holds the source weights
        assert torch.equal(after[key], value), key
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats for m in norms)  # a later fit updates the running statistics
    second = _trainer(inference_mode=False).test(module, datamodule=_Data([target]), verbose=False)
    assert second[0]["test/acc"] == first[0]["test/acc"]
    assert second[0]["test/ece"] == pytest.approx(first[0]["test/ece"], abs=1e-7)
