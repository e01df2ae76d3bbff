"""Backbones: pretrained networks behind the token/block contract."""

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.backbones.clip_resnet import CLIPResNetBackbone
from lightning_transfer.backbones.timm import TimmBackbone

__all__ = ["Backbone", "CLIPResNetBackbone", "TimmBackbone"]

from lightning_transfer._discover import import_submodules  # noqa: E402

# every module in this package registers itself on import: adding one is adding a file
import_submodules(__name__, __path__)
