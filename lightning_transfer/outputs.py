"""Typed outputs shared by backbones and strategies."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class BackboneOutput:
    """What :meth:`Backbone.forward_tokens` returns.

    Attributes:
        pooled: (B, num_features) pooled, final-normed features, the input of a linear head.
        tokens: (B, N, D) final-normed tokens (a (B, C, H, W) map for CNNs).
        hidden_states: ``depth + 1`` tensors when requested: ``[0]`` is the embedding output, ``[i]`` the output
            of block ``i`` (before the final norm); ``None`` otherwise.
    """

    pooled: Tensor
    tokens: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class StepLoss:
    """What :meth:`AdaptationStrategy.training_loss` returns for one training batch.

    Attributes:
        loss: the scalar the optimizer minimises.
        logits: (B, C) predictions on the labelled samples, for the training accuracy (None: not reported).
        targets: their labels: (B,) class indices (counted for accuracy) or (B, C) soft labels (not counted).
        terms: further named scalars, logged as ``train/<name>`` (means over the epoch), e.g. a domain loss.
    """

    loss: Tensor
    logits: Tensor | None = None
    targets: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
