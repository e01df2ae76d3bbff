"""Frozen auxiliary networks: a teacher (distillation), an old model (backward compatibility), run under no_grad.

A strategy that needs one holds a :class:`FrozenNetwork` as a submodule, built in its constructor from a backbone
config or from a fit checkpoint of this project (:func:`frozen_network`). Like the frozen backbone, its weights are
left out of the strategy's checkpoints, which record its identity and a digest of its weights instead; on reload the
network is built again from the same settings and its digest is checked (``checkpointing.CheckpointFormat``).
Trainable auxiliaries (a domain discriminator, a projector) are plain submodules of the strategy, saved with it.
"""

from __future__ import annotations

from pathlib import Path
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


def frozen_network(backbone: nn.Module | None = None, checkpoint: str | None = None, role: str = "teacher"
                   ) -> FrozenNetwork:
    """A :class:`FrozenNetwork` from exactly one of a backbone (as configured, e.g. its pretrained weights) or the
    path of a fit checkpoint (its backbone, strategy and head, reloaded with every checkpoint check)."""
    if (backbone is None) == (checkpoint is None):
        raise ValueError(f"give the {role} as exactly one of a backbone config ({role}_backbone) or a fit checkpoint "
                         f"({role}_checkpoint); got {'both' if backbone is not None else 'neither'}")
    if backbone is not None:
        return FrozenNetwork(backbone)
    from lightning_transfer.checkpointing import load_fit_checkpoint
    from lightning_transfer.module import TransferModule  # the module sits above the strategies that hold this

    path = str(Path(str(checkpoint)).expanduser())
    try:
        model: Any = load_fit_checkpoint(path, TransferModule, test_time=None)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{role}_checkpoint: {err}") from err
    identity = f"{path} ({type(model.adaptation).__name__} on {model.backbone.identity()})"
    return FrozenNetwork(model.backbone, model.adaptation, model.head, identity=identity)
