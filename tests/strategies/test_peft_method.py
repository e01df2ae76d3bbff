"""PeftMethod: any in-place peft tuner by name; merged and peft exports; errors that list what exists."""

from __future__ import annotations

import pytest
import torch

from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.peft_method import PeftMethod, peft_config_from_dict
from tests.helpers.models import inputs_for, tiny_vit
from tests.helpers.tiny_clip import tiny_clip


def _perturb(module: TransferModule) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize(("method", "config"), [
    ("IA3", {"target_modules": ["attn.qkv", "mlp.fc2"], "feedforward_modules": ["mlp.fc2"]}),
    ("LOHA", {"r": 2, "target_modules": "qv"}),
    ("LOKR", {"r": 2}),
])
def test_merged_state_reproduces_the_adapted_model(method, config):
    module = TransferModule(tiny_vit(), PeftMethod(method, config), num_classes=5).eval()
    _perturb(module)
    plain = tiny_vit().eval()
    plain.model.load_state_dict(module.adaptation.merged_backbone_state(module.backbone), strict=True)
    x = inputs_for(plain)
    with torch.no_grad():
        adapted = module.backbone(x)
        assert not torch.allclose(adapted, tiny_vit().eval()(x), atol=1e-3), "the perturbation changed nothing"
        torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=0)


def test_ia3_scales_only_the_targets():
    module = TransferModule(tiny_vit(), PeftMethod("IA3", {"target_modules": ["mlp.fc2"],
                                                           "feedforward_modules": ["mlp.fc2"]}), num_classes=5)
    trainable = [n for n, p in module.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp.fc2.ia3_l" in n for n in trainable)
    width = tiny_vit().model.blocks[0].mlp.fc2.in_features  # IA3 on a feed-forward layer scales its input
    assert sum(module.backbone.get_parameter(n).numel() for n in trainable) == 6 * width


def test_ia3_runs_with_its_defaults():
    module = TransferModule(tiny_vit(), PeftMethod("IA3"), num_classes=5)  # feedforward_modules defaults to []
    assert module.adaptation.peft_config.feedforward_modules == set()
    assert any(".ia3_l" in n for n, p in module.named_parameters() if p.requires_grad)


def test_ia3_on_clip_adapts_the_image_tower_only():
    config = {"target_modules": "default", "feedforward_modules": ["mlp.fc2"]}  # mlp.fc2 is in both towers
    module = TransferModule(tiny_clip(), PeftMethod("IA3", config), num_classes=5)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if "text_model" in n]
    assert all(n.startswith("model.vision_model.") for n in module.adaptation.peft_config.feedforward_modules)


@pytest.mark.parametrize(("method", "config"), [
    ("LOHA", {"r": 2, "target_modules": ["attn.qkv"]}),
    ("IA3", {"target_modules": ["attn.qkv", "mlp.fc2"], "feedforward_modules": ["mlp.fc2"]}),
])
def test_export_peft_loads_back_with_peft(method, config, tmp_path):
    from peft import PeftModel

    module = TransferModule(tiny_vit(), PeftMethod(method, config), num_classes=5).eval()
    _perturb(module)
    module.adaptation.save_peft(module.backbone, tmp_path / "peft")
    fresh = tiny_vit()
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "peft")).eval()
    x = inputs_for(fresh)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.backbone(x), atol=1e-5, rtol=0)


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="IA3"):
        PeftMethod("NOT_A_METHOD")
    with pytest.raises(ValueError, match="cannot be injected"):
        peft_config_from_dict("PROMPT_TUNING", {})
    with pytest.raises(ValueError, match="pretrained weights"):
        PeftMethod("IA3", {"modules_to_save": ["norm"]})
    with pytest.raises(ValueError, match="bad config"):
        PeftMethod("LOHA", {"rank": 4})
