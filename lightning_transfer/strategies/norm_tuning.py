"""NormTuning: only the affine parameters of the backbone's normalisation layers (and the head) train."""

from __future__ import annotations

from torch import nn

from lightning_transfer import distributed
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze
from lightning_transfer.strategies.bitfit import keep_bn_statistics

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, *distributed.BATCH_NORM_TYPES, nn.GroupNorm,
                                           nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm/BatchNorm/GroupNorm/InstanceNorm, and norm classes of other libraries (timm ``LayerNorm2d``,
    ``RmsNorm``, HF ``BertLayerNorm``...) recognised by name."""
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


@register_strategy("norm_tuning")
class NormTuning(AdaptationStrategy):
    """Norm tuning: only LayerNorm/BatchNorm affine parameters train (LN tuning arXiv:2312.11420; BN: 2003.00152).

    For BatchNorm only gamma and beta train; the running statistics stay the pretrained ones (BN layers are kept in
    eval mode), so the baseline measures what the affine terms alone buy.

    Args:
        train_bias: also train the norms' shift (beta); False trains the scales (gamma) only.
    """

    trains_backbone = True

    def __init__(self, train_bias: bool = True) -> None:
        super().__init__()
        self.train_bias = train_bias

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        count = 0
        for module in backbone.modules():
            if is_norm(module):
                for name, p in module.named_parameters(recurse=False):
                    if name != "bias" or self.train_bias:
                        p.requires_grad_(True)
                        count += 1
        if count == 0:
            raise ValueError(f"{backbone.identity()} has no normalisation layers with affine parameters: use "
                             "BitFit, LoRA or LinearProbe")

    def set_train_mode(self, backbone: Backbone, head: nn.Module | None, mode: bool) -> None:
        if mode:
            keep_bn_statistics(backbone)
