"""FSDP for large backbones: the config builds, the wrap policy keeps frozen weights out of trainable units, and (on a
GPU) a LoRA fit under FSDP writes the same small checkpoint as without it."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_transfer.distributed import BlockWrapPolicy, _owned_modules
from lightning_transfer.module import TransferModule
from lightning_transfer.registry import STRATEGIES
from tests.conftest import REPO
from tests.helpers.models import TINY_VIT, _tag, pretrained_file, tiny_vit

FSDP_YAML = REPO / "configs" / "trainer" / "fsdp.yaml"


def test_fsdp_config_builds_the_strategy_with_the_block_policy():
    parser = LightningArgumentParser(parser_mode="omegaconf")
    parser.add_lightning_class_args(Trainer, "trainer")
    config = parser.parse_path(str(FSDP_YAML))
    strategy = parser.instantiate_classes(config).trainer.strategy  # the Trainer itself needs a GPU
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], BlockWrapPolicy)
    assert strategy.kwargs["use_orig_params"] is True and config.trainer.precision == "bf16-mixed"


def _mixed_units(module: nn.Module, units: set[nn.Module]) -> list[str]:
    """Units (the root and ``units``) whose own parameters, outside nested units, are partly frozen, partly trained."""
    mixed = []
    for unit in [module, *units]:
        owned = _owned_modules(unit, units - {unit})
        if len({p.requires_grad for m in owned for p in m.parameters(recurse=False)}) == 2:
            mixed.append(type(unit).__name__)
    return mixed


@pytest.mark.parametrize(("name", "args"), [("lora", {"r": 4}), ("linear_probe", {}), ("adapter", {"bottleneck": 4}),
                                            ("full", {})])
def test_block_policy_keeps_frozen_weights_out_of_trainable_units(name, args):
    module = TransferModule(tiny_vit(), STRATEGIES.get(name)(**args), num_classes=5)
    policy = BlockWrapPolicy()
    units = policy.plan(module)
    blocks = list(module.backbone.blocks)
    assert set(blocks) <= units  # every transformer block is a unit
    assert not _mixed_units(module, units)
    if name == "full":  # nothing frozen: blocks only, no tiny units
        assert units == set(blocks)
    # FSDP's callable interface gives the same answers, root first
    assert policy(module, True, 0) and all(policy(m, False, 0) == (m in units) for m in module.modules())


@pytest.mark.gpu
def test_fsdp_lora_fit_on_gpu_writes_a_small_checkpoint_that_reloads(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("FSDP needs a CUDA device")
    from lightning_transfer.cli import TransferCLI

    weights = pretrained_file(TINY_VIT, _tag("tiny_vit", TINY_VIT))
    cli = TransferCLI(args=["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--config", str(FSDP_YAML),
                            f"--model.backbone.init_args.checkpoint_path={weights}", "--model.adaptation=LoRA",
                            "--trainer.devices=1", "--trainer.max_steps=3", "--trainer.logger=false",
                            "--trainer.default_root_dir=out"])
    assert isinstance(cli.trainer.strategy, FSDPStrategy) and cli.trainer.state.finished
    path = cli.trainer.checkpoint_callback.last_model_path
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert any("lora_" in k for k in saved) and "head.fc.weight" in saved
    assert not any(k.endswith("attn.qkv.base_layer.weight") or k.endswith("patch_embed.proj.weight") for k in saved)
    loaded = TransferModule.load_from_checkpoint(path, weights_only=True)
    for key, value in saved.items():
        assert torch.equal(loaded.state_dict()[key].cpu(), value.cpu()), key
