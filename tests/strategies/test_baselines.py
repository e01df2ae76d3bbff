"""BitFit and NormTuning train exactly the parameters they name; BatchNorm statistics stay pretrained."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.bitfit import BitFit
from lightning_transfer.strategies.norm_tuning import NormTuning
from tests.helpers.models import inputs_for, tiny_cnn, tiny_vit
from tests.helpers.text_models import tiny_bert


def _trainable_backbone(module: TransferModule) -> set[str]:
    return {n for n, p in module.backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("factory", [tiny_vit, tiny_cnn, tiny_bert])
def test_bitfit_trains_every_bias_and_nothing_else(factory):
    module = TransferModule(factory(), BitFit(), num_classes=5)
    expected = {n for n, _ in module.backbone.named_parameters() if n.endswith(".bias")}
    assert expected and _trainable_backbone(module) == expected


@pytest.mark.parametrize("factory", [tiny_vit, tiny_cnn, tiny_bert])
def test_norm_tuning_trains_norm_affine_parameters_only(factory):
    module = TransferModule(factory(), NormTuning(), num_classes=5)
    expected = {f"{m}.{p}" for m, mod in module.backbone.named_modules()
                if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d)) for p, _ in mod.named_parameters(recurse=False)}
    assert expected and _trainable_backbone(module) == expected
    scales_only = TransferModule(factory(), NormTuning(train_bias=False), num_classes=5)
    assert _trainable_backbone(scales_only) == {n for n in expected if n.endswith(".weight")}


@pytest.mark.parametrize("strategy", [BitFit, NormTuning])
def test_batchnorm_statistics_stay_pretrained_in_training(strategy):
    module = TransferModule(tiny_cnn(), strategy(), num_classes=5)
    stats = {k: v.clone() for k, v in module.backbone.named_buffers() if "running" in k}
    module.train()
    assert all(not m.training for m in module.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    x = inputs_for(module.backbone, batch=6)
    module.adaptation.loss(module(x), (x, torch.arange(6) % 5)).backward()
    for k, v in module.backbone.named_buffers():
        if k in stats:
            assert torch.equal(v, stats[k]), f"{k} changed"
