"""Classification heads."""

from __future__ import annotations

from torch import Tensor, nn


class LinearHead(nn.Module):
    """A linear classifier on pooled features, with optional dropout before it.

    Args:
        in_features: width of the features (the backbone's ``num_features`` unless the strategy says otherwise).
        num_classes: number of output classes.
        dropout: dropout rate on the features.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(
                f"num_classes must be >= 1, got {num_classes}: set model.num_classes or use a datamodule that "
                "provides it (the CLI links data.num_classes into the model)"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.dropout(features))  # (B, num_classes)
