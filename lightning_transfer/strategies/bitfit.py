"""BitFit: only the bias terms of the backbone (and the head) train."""

from __future__ import annotations

from torch import nn

from lightning_transfer import distributed
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze


def keep_bn_statistics(backbone: nn.Module) -> None:
    """Put BatchNorm layers in eval mode: their running statistics stay the pretrained ones while affine terms train."""
    for module in backbone.modules():
        if isinstance(module, distributed.BATCH_NORM_TYPES):
            module.eval()


def bias_names(backbone: nn.Module) -> list[str]:
    """Names of every bias parameter (Linear, Conv, norm ``bias``; also timm/HF names ending in ``_bias``)."""
    return [n for n, _ in backbone.named_parameters() if n.rpartition(".")[2] == "bias" or n.endswith("_bias")]


@register_strategy("bitfit")
class BitFit(AdaptationStrategy):
    """BitFit: fine-tune only the backbone's bias terms, a cheap baseline (arXiv:2106.10199).

    Every bias trains (attention, MLP, norm and convolution biases); weights stay frozen. Dropout follows the
    module's train/eval mode, but BatchNorm running statistics are kept at their pretrained values.
    """

    trains_backbone = True

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        names = set(bias_names(backbone))
        if not names:
            raise ValueError(f"{backbone.identity()} has no bias parameters, so BitFit would train only the head: "
                             "use LinearProbe, NormTuning or LoRA")
        for name, p in backbone.named_parameters():
            p.requires_grad_(name in names)

    def set_train_mode(self, backbone: Backbone, head: nn.Module | None, mode: bool) -> None:
        if mode:
            keep_bn_statistics(backbone)
