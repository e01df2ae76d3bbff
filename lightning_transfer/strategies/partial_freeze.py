"""PartialFreeze: freeze the embedding and the first k blocks, tune the rest (Yosinski et al. 2014)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy


@register_strategy("partial_freeze")
class PartialFreeze(AdaptationStrategy):
    """Freeze the embedding and the first ``num_frozen_blocks`` blocks; the later blocks, final norm and head train.

    The setting of Yosinski et al. 2014, "How transferable are features in deep neural networks?" (arXiv:1411.1792).
    The frozen part runs in eval mode and under ``no_grad`` so it stores no activations.

    Args:
        num_frozen_blocks: how many blocks (stages for CNNs) stay frozen; 0 freezes only the embedding,
            a negative value counts from the end (-1 = tune only the last block).
    """

    trains_backbone = True

    def __init__(self, num_frozen_blocks: int = 1) -> None:
        super().__init__()
        self.num_frozen_blocks = num_frozen_blocks

    def frozen_count(self, backbone: Backbone) -> int:
        k = self.num_frozen_blocks
        if not -backbone.depth <= k <= backbone.depth:
            raise ValueError(
                f"num_frozen_blocks={k} is out of range for {backbone.identity()}, which has {backbone.depth} blocks: "
                f"use a value in [-{backbone.depth}, {backbone.depth}]"
            )
        return k % (backbone.depth + 1) if k >= 0 else backbone.depth + k

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        k = self.frozen_count(backbone)
        layer_of = backbone.layer_ids()
        for name, p in backbone.named_parameters():
            p.requires_grad_(layer_of[name] > k)

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        assert head is not None
        k = self.frozen_count(backbone)
        with torch.no_grad():
            tokens = backbone.embed(inputs)
            for i in range(k):
                tokens = backbone.run_block(i, tokens)
        for i in range(k, backbone.depth):
            tokens = backbone.run_block(i, tokens)
        return head(backbone.pool(backbone.finalize(tokens)))

    def set_train_mode(self, backbone: Backbone, head: nn.Module | None, mode: bool) -> None:
        if mode:
            _eval_frozen(backbone)  # dropout off, BatchNorm statistics frozen where nothing trains


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _eval_frozen(module: nn.Module) -> None:
    """Put in eval mode every submodule with no trainable parameter beneath it, never an ancestor of one that trains.

    ``eval()`` recurses, so calling it on a module that merely owns a frozen parameter (a timm ViT's root owns
    ``cls_token``; a CLIPModel owns ``logit_scale``) would switch off dropout and drop-path in the trained blocks.
    A parameter-less child (``pos_drop``) goes with the nearest earlier sibling that has parameters: after the
    frozen embedding it is off, after a trained layer (a head dropout) or first in its parent it stays on.
    """
    follows_frozen = False
    for child in module.children():
        if any(True for _ in child.parameters()):
            follows_frozen = not _trains(child)
            if follows_frozen:
                child.eval()
            else:
                _eval_frozen(child)
        elif follows_frozen:
            child.eval()
