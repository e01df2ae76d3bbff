"""The linear classification head."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_transfer.heads.base import Head
from lightning_transfer.registry import register_head


@register_head("linear")
class LinearHead(Head):
    """A linear classifier on pooled features, with optional dropout before it (the default head).

    Args:
        in_features: width of the features; the module gives it (the strategy's ``head_in_features``) when unset.
        num_classes: number of classes; the module gives it when unset.
        dropout: dropout rate on the features.
    """

    def __init__(self, in_features: int | None = None, num_classes: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {dropout}: 0.0 disables the head's dropout")
        self.dropout_rate = dropout
        if in_features is not None and num_classes is not None:
            self.build(in_features, num_classes)

    def build(self, in_features: int, num_classes: int) -> None:
        super().build(in_features, num_classes)
        self.dropout = nn.Dropout(self.dropout_rate) if self.dropout_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.dropout(features))  # (B, num_classes)
