"""FrozenNetwork: a frozen auxiliary network (a teacher, an old model) that a strategy runs under no_grad.

Like the frozen backbone, its weights are left out of the strategy's checkpoints, which record its identity and a
digest of its weights (``checkpointing.CheckpointFormat``); :func:`lightning_transfer.auxiliary.frozen_network`
builds one from a backbone config or a fit checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class FrozenNetwork(nn.Module):
    """A frozen network in eval mode whose forward runs under ``torch.no_grad``: a backbone (features), or a
    backbone with a strategy and head from a fit checkpoint (logits as well).

    Args:
        backbone: the network's backbone.
        adaptation: the strategy it was trained with (a fit checkpoint's), or None for a bare backbone.
        head: its head, or None.
        identity: what it was built from, for messages (a backbone identity or a checkpoint path).
    """

    backbone: Any  # a Backbone
    adaptation: Any  # an AdaptationStrategy, or None
    head: Any  # nn.Module | None

    def __init__(self, backbone: nn.Module, adaptation: nn.Module | None = None, head: nn.Module | None = None,
                 identity: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self.adaptation = adaptation
        self.head = head
        self.source = identity or getattr(backbone, "identity", lambda: type(backbone).__name__)()
        self.requires_grad_(False)
        self.eval()

    def identity(self) -> str:
        return self.source

    def train(self, mode: bool = True) -> FrozenNetwork:
        return super().train(False)  # always eval: dropout off, BatchNorm statistics fixed

    @property
    def has_logits(self) -> bool:
        """True when :meth:`forward` gives class logits (a network from a fit checkpoint), not features."""
        return self.adaptation is not None

    @torch.no_grad()
    def forward(self, inputs: Tensor) -> Tensor:
        """Logits (B, C) of a network with a head; else the pooled features (B, D)."""
        if self.adaptation is None:
            return self.backbone(inputs)
        return self.adaptation(self.backbone, self.head, inputs)

    @torch.no_grad()
    def features(self, inputs: Tensor) -> Tensor:
        """The features its head reads (B, D)."""
        if self.adaptation is None:
            return self.backbone(inputs)
        return self.adaptation.features(self.backbone, inputs)

    @torch.no_grad()
    def hidden_states(self, inputs: Tensor) -> tuple[Tensor, ...]:
        """``depth + 1`` hidden states of its backbone (embedding output, then each block's)."""
        return self.backbone.forward_tokens(inputs, return_hidden_states=True).hidden_states
