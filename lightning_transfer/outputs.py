"""Typed outputs shared by backbones and strategies."""

from __future__ import annotations

from dataclasses import dataclass

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
