"""The Backbone contract on timm models: the hand-run pipeline equals timm's own forward."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_transfer.backbones.timm import TimmBackbone

SPECS = {
    "test_vit": {"model_name": "test_vit", "model_kwargs": {"img_size": 32}},
    "vit_patch8": {"model_name": "test_vit", "model_kwargs": {"img_size": 32, "patch_size": 8, "in_chans": 1}},
    "vit_small_p32": {"model_name": "vit_small_patch32_224", "model_kwargs": {"img_size": 64, "depth": 2}},
    "test_resnet": {"model_name": "test_resnet", "data_config": {"input_size": [3, 32, 32]}},
    "test_convnext": {"model_name": "test_convnext", "data_config": {"input_size": [3, 32, 32]}},
}


def _x(backbone: TimmBackbone, batch: int = 2) -> torch.Tensor:
    c, h, w = backbone.data_config()["input_size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hand_run_pipeline_equals_timm_forward(name):
    backbone = TimmBackbone(**SPECS[name]).eval()
    x = _x(backbone)
    with torch.no_grad():
        tokens = backbone.embed(x)
        for i in range(backbone.depth):
            tokens = backbone.run_block(i, tokens)
        pooled = backbone.pool(backbone.finalize(tokens))
        reference = backbone.model(x)  # timm's own forward (num_classes=0: pre-logits features)
    torch.testing.assert_close(pooled, reference, atol=1e-6, rtol=0)
    assert pooled.shape == (2, backbone.num_features)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hidden_states_and_metadata(name):
    backbone = TimmBackbone(**SPECS[name]).eval()
    out = backbone.forward_tokens(_x(backbone), return_hidden_states=True)
    assert len(out.hidden_states) == backbone.depth + 1
    if backbone.has_tokens:
        n_patches = backbone.model.patch_embed.num_patches
        assert out.hidden_states[0].shape == (2, n_patches + backbone.num_prefix_tokens, backbone.embed_dim)
        modules = dict(backbone.named_modules())
        for suffix in backbone.lora_target_modules:
            hits = [m for n, m in modules.items() if n.endswith(suffix)]
            assert len(hits) == backbone.depth and all(isinstance(m, nn.Linear) for m in hits), suffix
    ids = backbone.layer_ids()
    assert set(ids.values()) <= set(range(backbone.depth + 2)) and max(ids.values()) >= backbone.depth


def test_patch_size_changes_token_count():
    a = TimmBackbone(**SPECS["test_vit"])
    b = TimmBackbone(**SPECS["vit_patch8"])
    assert a.embed(_x(a)).shape[1] == (32 // 16) ** 2 + 1
    assert b.embed(_x(b)).shape[1] == (32 // 8) ** 2 + 1
    assert b.data_config()["input_size"] == (1, 32, 32) and len(b.data_config()["mean"]) == 1


def test_checkpoint_path_loads_local_weights(tmp_path):
    torch.manual_seed(1)
    source = TimmBackbone(**SPECS["test_vit"])
    path = tmp_path / "weights.safetensors"
    save_file(source.export_state_dict(), str(path))
    torch.save(source.export_state_dict(), tmp_path / "weights.pth")
    for file in (path, tmp_path / "weights.pth"):
        torch.manual_seed(2)
        loaded = TimmBackbone(**SPECS["test_vit"], checkpoint_path=str(file))
        for (k, v), (_, w) in zip(source.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(v, w), k


def test_checkpoint_path_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        TimmBackbone(**SPECS["test_vit"], checkpoint_path=str(tmp_path / "missing.safetensors"))
    other = TimmBackbone(**SPECS["test_resnet"])
    path = tmp_path / "resnet.safetensors"
    save_file(other.export_state_dict(), str(path))
    with pytest.raises(ValueError, match="missing keys: cls_token.*unexpected keys: "):
        TimmBackbone(**SPECS["test_vit"], checkpoint_path=str(path))
    bad = tmp_path / "code.pt"
    torch.save({"model": nn.Linear(2, 2)}, bad)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="weights_only=True"):
        TimmBackbone(**SPECS["test_vit"], checkpoint_path=str(bad))


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm model_name 'vit_nonexistent_xyz'"):
        TimmBackbone("vit_nonexistent_xyz")
