"""Tiny weight-free backbones for tests.

"Weight-free" means nothing is downloaded: each tiny model is initialised once with a fixed seed and written to a
local weights file, which the factories load through ``checkpoint_path`` (the same path a user's local weights
take), so a checkpoint can be reloaded onto the same frozen "pretrained" weights.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_transfer.backbones.timm import TimmBackbone

# A ViT on 8x8 single-channel inputs: 16 patches + CLS, width 64, depth 6 (timm's test_vit).
TINY_VIT = {"model_name": "test_vit", "model_kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1},
            "data_config": {"mean": [0.3], "std": [0.35]}}
# timm's test_resnet on 3x32x32 inputs.
TINY_CNN = {"model_name": "test_resnet", "data_config": {"input_size": [3, 32, 32]}}

_WEIGHTS_DIR = Path(tempfile.gettempdir()) / "lightning-transfer-test-weights"


def pretrained_file(spec: dict, tag: str) -> str:
    """A deterministic "pretrained" weights file for ``spec`` (seed 0), written once per machine."""
    path = _WEIGHTS_DIR / f"{tag}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        backbone = TimmBackbone(**spec)
        _WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(backbone)}")
        save_file({k: v.contiguous() for k, v in backbone.export_state_dict().items()}, str(tmp))
        tmp.replace(path)
    return str(path)


def _tag(name: str, spec: dict) -> str:
    return f"{name}_{hashlib.sha1(repr(sorted(spec.items())).encode()).hexdigest()[:10]}"


def tiny_vit(**overrides) -> TimmBackbone:
    spec = {**TINY_VIT, **overrides}
    return TimmBackbone(**spec, checkpoint_path=pretrained_file(spec, _tag("tiny_vit", spec)))


def tiny_cnn(**overrides) -> TimmBackbone:
    spec = {**TINY_CNN, **overrides}
    return TimmBackbone(**spec, checkpoint_path=pretrained_file(spec, _tag("tiny_cnn", spec)))


def inputs_for(backbone: TimmBackbone, batch: int = 4) -> torch.Tensor:
    c, h, w = backbone.data_config()["input_size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(1))


# name -> factory; contract cases pick backbones by these names
BACKBONE_FACTORIES = {"vit": tiny_vit, "cnn": tiny_cnn}
