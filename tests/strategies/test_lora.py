"""LoRA: the fused-qkv ``qv`` target, merged and peft exports, small checkpoints on a ViT-B/16-shaped model."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_transfer.__main__ import main
from lightning_transfer.backbones.timm import TimmBackbone
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies._peft import FusedQKV
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.strategies.lora import LoRA, lora_delta, lora_scaling
from tests.helpers.models import TINY_VIT, inputs_for, tiny_vit
from tests.helpers.tiny_clip import tiny_clip, tiny_clip_resnet


def _perturb_adapters(module: TransferModule, std: float = 0.05) -> None:
    """Give every trainable tensor a non-zero value, as training would."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _train_steps(module: TransferModule, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.05)
    module.train()
    x = inputs_for(module.backbone, batch=8)
    y = torch.arange(8) % 5
    for _ in range(steps):
        optimizer.zero_grad()
        module.adaptation.loss(module(x), (x, y)).backward()
        optimizer.step()


def test_lora_delta_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    scale = lora_scaling(4, 8.0)
    reference = torch.zeros(5, 6)
    for i in range(5):
        for j in range(6):
            reference[i, j] = scale * sum(b[i, k] * a[k, j] for k in range(4))
    torch.testing.assert_close(lora_delta(a, b, scale), reference)
    assert lora_scaling(16, 32.0) == 2.0 and lora_scaling(16, 32.0, use_rslora=True) == 8.0


def test_qv_target_adapts_only_q_and_v_rows_of_fused_qkv():
    module = TransferModule(tiny_vit(), LoRA(r=4, alpha=4), num_classes=5)
    qkv = module.backbone.model.blocks[0].attn.qkv
    assert isinstance(qkv, FusedQKV)
    assert not hasattr(qkv.k, "lora_A"), "k rows must not be adapted"
    assert hasattr(qkv.q, "lora_A") and hasattr(qkv.v, "lora_A")
    original = tiny_vit().export_state_dict()
    _train_steps(module)
    merged = module.adaptation.merged_backbone_state(module.backbone)
    dim = module.backbone.embed_dim
    for i in range(module.backbone.depth):
        w0, w = original[f"blocks.{i}.attn.qkv.weight"], merged[f"blocks.{i}.attn.qkv.weight"]  # (3D, D)
        assert torch.equal(w[dim:2 * dim], w0[dim:2 * dim]), f"block {i}: k rows of the effective weight changed"
        assert not torch.equal(w[:dim], w0[:dim]) and not torch.equal(w[2 * dim:], w0[2 * dim:])
        torch.testing.assert_close(merged[f"blocks.{i}.attn.qkv.bias"], original[f"blocks.{i}.attn.qkv.bias"])


def test_merged_backbone_state_equals_the_scaled_low_rank_update():
    module = TransferModule(tiny_vit(), LoRA(r=4, alpha=8, target_modules=["attn.proj"]), num_classes=5)
    _perturb_adapters(module)
    proj = module.backbone.model.blocks[2].attn.proj
    expected = proj.base_layer.weight + lora_delta(proj.lora_A["default"].weight, proj.lora_B["default"].weight,
                                                   module.adaptation.scaling)
    merged = module.adaptation.merged_backbone_state(module.backbone)
    torch.testing.assert_close(merged["blocks.2.attn.proj.weight"], expected)
    assert set(merged) == set(tiny_vit().export_state_dict()), "merged state must have the plain model's keys"


@pytest.mark.parametrize("kwargs", [{}, {"use_dora": True, "target_modules": "default"}])
def test_export_merged_from_the_cli_gives_equal_logits(kwargs, tmp_path):
    module = TransferModule(tiny_vit(), LoRA(r=4, alpha=4, **kwargs), num_classes=5)
    _perturb_adapters(module)
    ckpt = _save(module, tmp_path / "run.ckpt")
    main(["export", "--ckpt_path", str(ckpt), "--format", "merged", "--output", str(tmp_path / "merged")])
    plain = TimmBackbone(**TINY_VIT, checkpoint_path=str(tmp_path / "merged" / "backbone.safetensors")).eval()
    head = load_file(str(tmp_path / "merged" / "head.safetensors"))
    x = inputs_for(plain)
    with torch.no_grad():
        logits = torch.nn.functional.linear(plain(x), head["fc.weight"], head["fc.bias"])
        torch.testing.assert_close(logits, module.eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{"use_rslora": True}, {"target_modules": "default", "dropout": 0.1}])
def test_export_peft_loads_back_with_peft(kwargs, tmp_path):
    from peft import PeftModel

    module = TransferModule(tiny_vit(), LoRA(r=4, alpha=8, **kwargs), num_classes=5)
    _perturb_adapters(module)
    ckpt = _save(module, tmp_path / "run.ckpt")
    out = tmp_path / "peft"
    main(["export", "--ckpt_path", str(ckpt), "--format", "peft", "--output", str(out)])
    config = json.loads((out / "adapter_config.json").read_text())
    if kwargs.get("target_modules") is None:  # split q/v rewritten as one rank-2r LoRA on the fused layer
        assert config["r"] == 8 and all(t.endswith("attn.qkv") for t in config["target_modules"])
    fresh = tiny_vit()  # the plain timm model a peft user has
    peft_model = PeftModel.from_pretrained(fresh.model, str(out)).eval()
    x = inputs_for(fresh)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), module.eval().backbone(x), atol=1e-5, rtol=0)


def test_lora_errors_name_the_fix():
    with pytest.raises(ValueError, match="rank r"):
        LoRA(r=0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRA(init_lora_weights="pissa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="match no module"):
        TransferModule(tiny_vit(), LoRA(target_modules=["attn.nope"]), num_classes=5)
    with pytest.raises(ValueError, match="layers_to_transform"):
        TransferModule(tiny_vit(), LoRA(layers_to_transform=[99]), num_classes=5)
    with pytest.raises(ValueError, match=r"target_modules \['patch_embed.proj'\] match no module inside blocks "
                                         r"layers_to_transform=\[0\]"):
        TransferModule(tiny_vit(), LoRA(target_modules=["patch_embed.proj"], layers_to_transform=[0]), num_classes=5)


def _save(module: TransferModule, path):
    """What ModelCheckpoint writes (state dict through on_save_checkpoint, hyperparameters), without a Trainer."""
    import lightning

    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_tiny_lora_checkpoint_holds_adapters_and_head_only(tmp_path):
    module = TransferModule(tiny_vit(), LoRA(r=4, alpha=4), num_classes=5)
    saved = torch.load(_save(module, tmp_path / "lora.ckpt"), weights_only=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable
    assert saved["hyper_parameters"]["adaptation"]["init_args"]["r"] == 4


@pytest.mark.slow  # two ViT-B/16 models and a 340 MB digest: ~20 s of CPU
def test_vit_b16_lora_checkpoint_is_small_and_reloads_strictly(tmp_path):
    spec = {"model_name": "vit_base_patch16_224"}  # random weights: only the sizes matter
    torch.manual_seed(0)
    full = TransferModule(TimmBackbone(**spec), FullFinetune(), num_classes=10)
    kept, _ = full.checkpoint_format.split(full, full.state_dict())
    full_bytes = sum(v.numel() * v.element_size() for v in kept.values())
    del full
    torch.manual_seed(0)
    module = TransferModule(TimmBackbone(**spec), LoRA(r=8, alpha=8), num_classes=10)
    assert module.parameter_counts()["trainable"] == 12 * 2 * (8 * 768 + 768 * 8) + 768 * 10 + 10
    _perturb_adapters(module, std=0.01)
    path = _save(module, tmp_path / "lora.ckpt")
    size = path.stat().st_size
    assert size < 0.05 * full_bytes, f"LoRA checkpoint {size / 2**20:.1f} MB vs full {full_bytes / 2**20:.1f} MB"
    saved = torch.load(path, weights_only=True)
    assert all(".lora_" in k or k.startswith("head.") for k in saved["state_dict"]), sorted(saved["state_dict"])[:4]
    torch.manual_seed(0)  # the same "pretrained" weights as the run
    loaded = TransferModule.load_from_checkpoint(path, weights_only=True, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), module.eval()(x))
    buffer = io.BytesIO()
    torch.save(saved["hyper_parameters"], buffer)  # plain values only


@pytest.mark.parametrize("factory", [tiny_clip, tiny_clip_resnet])
def test_lora_on_clip_adapts_the_image_tower_only(factory):
    module = TransferModule(factory(), LoRA(r=2), num_classes=5)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if "text_model" in n], "the image strategies never run the text tower"
    module.train()
    channels, height, width = module.backbone.data_config()["input_size"]
    module(torch.randn(2, channels, height, width)).sum().backward()
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"trainable but never used (DDP fails on these): {unused[:4]}"


def test_lora_target_outside_the_image_tower_is_an_error():
    with pytest.raises(ValueError, match=r"text_model.*outside the image tower \(model.vision_model\)"):
        TransferModule(tiny_clip(), LoRA(target_modules=["text_model.encoder.layers.0.self_attn.q_proj"]),
                       num_classes=5)
