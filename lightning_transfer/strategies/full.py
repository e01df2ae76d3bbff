"""FullFinetune: every backbone weight trains, optionally with layer-wise learning-rate decay."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, no_weight_decay


def layer_lr_scales(depth: int, layer_decay: float | None, backbone_lr_scale: float) -> list[float]:
    """Learning-rate scale of layer ids 0..depth+1 (embedding, blocks, final norm).

    With decay ``d`` the layer ``i`` gets ``d ** (depth + 1 - i)`` (BEiT/MAE convention; the head gets 1), then the
    whole backbone is multiplied by ``backbone_lr_scale``.
    """
    decay = 1.0 if layer_decay is None else layer_decay
    return [backbone_lr_scale * decay ** (depth + 1 - i) for i in range(depth + 2)]


@register_strategy("full")
class FullFinetune(AdaptationStrategy):
    """Full fine-tuning: the backbone and the head train (the reference every PETL method is compared to).

    Args:
        layer_decay: layer-wise learning-rate decay in (0, 1] (e.g. 0.65 for ViT-B, BEiT arXiv:2106.08254);
            ``None`` disables it.
        backbone_lr_scale: multiplier of the backbone's learning rate relative to the head's.
    """

    trains_backbone = True

    def __init__(self, layer_decay: float | None = None, backbone_lr_scale: float = 1.0) -> None:
        super().__init__()
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}; use None to disable it")
        if not (math.isfinite(backbone_lr_scale) and backbone_lr_scale >= 0):
            raise ValueError(f"backbone_lr_scale must be a finite number >= 0, got {backbone_lr_scale}: use e.g. 0.1 "
                             "for a backbone learning rate 10x below the head's, 1.0 for the same")
        self.layer_decay = layer_decay
        self.backbone_lr_scale = backbone_lr_scale

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        backbone.requires_grad_(True)

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs):  # type: ignore[override]
        assert head is not None
        return head(backbone(inputs))

    def param_groups(self, backbone: Backbone, head: nn.Module | None) -> list[dict[str, Any]]:
        if self.layer_decay is None and self.backbone_lr_scale == 1.0:
            return super().param_groups(backbone, head)
        scales = layer_lr_scales(backbone.depth, self.layer_decay, self.backbone_lr_scale)
        layer_of = backbone.layer_ids()
        names = self.no_weight_decay_names | backbone.no_weight_decay_names
        groups: dict[tuple[float, bool], list] = {}
        for name, p in self.named_trainable(backbone, head):
            scale = scales[layer_of[name[len("backbone."):]]] if name.startswith("backbone.") else 1.0
            groups.setdefault((scale, no_weight_decay(name, p, names)), []).append(p)
        out = []
        for (scale, nd), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            group: dict[str, Any] = {"params": params, "lr_scale": scale}
            if nd:
                group["weight_decay"] = 0.0
            out.append(group)
        return out
