"""SHERL: an anti-redundancy merge of frozen hidden states, fed through the last pretrained block(s)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze


def redundancy(shallow: Tensor, eps: float = 1e-6) -> Tensor:
    """``r_i = sum_j ReLU(cos(s_i, s_j))`` over the shallow set, per token (j = i included, so r_i >= 1).

    Args:
        shallow: (L, B, N, d) projected shallow features.

    Returns:
        (L, B, N) redundancy of each layer's feature.
    """
    unit = F.normalize(shallow, dim=-1, eps=eps)  # (L, B, N, d)
    cos = torch.einsum("ibnd,jbnd->ijbn", unit, unit)  # (L, L, B, N)
    return cos.relu().sum(1)


def anti_redundancy_weights(shallow: Tensor, guide: Tensor, score_weight: Tensor, score_bias: Tensor,
                            eps: float = 1e-6) -> Tensor:
    """``alpha_i = a_i / (sum_j |a_j| + eps)`` with ``a_i = ReLU(w.(s_i * g) + b) / r_i``.

    Args:
        shallow: (L, B, N, d) projected shallow features s_0..s_{K-1}.
        guide: (B, N, d) projected guide feature g = s_K.
        score_weight: (d,) relevance scorer w.
        score_bias: () relevance scorer bias b.

    Returns:
        (L, B, N) L1-normalised weights of the shallow features.
    """
    relevance = ((shallow * guide) @ score_weight + score_bias).relu()  # (L, B, N)
    scores = relevance / redundancy(shallow, eps)
    return scores / (scores.abs().sum(0, keepdim=True) + eps)


def aggregate(shallow: Tensor, guide: Tensor, weights: Tensor) -> Tensor:
    """``z = sum_i alpha_i s_i + g``: (L, B, N, d), (B, N, d), (L, B, N) -> (B, N, d)."""
    return (weights.unsqueeze(-1) * shallow).sum(0) + guide


class _Projection(nn.Module):
    """phi_i: D -> d, in one of the official codebases' forms."""

    def __init__(self, dim: int, width: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.down = nn.Linear(dim, width)
        if kind == "gated":  # CLIP-ViL / T5: u = ReLU(W1 h); s = (W2 u + u) * sigmoid(W3 u)
            self.up = nn.Linear(width, width)
            self.gate = nn.Linear(width, width)
        elif kind == "linear_norm":  # VSE BERT: s = LN(W h)
            self.norm = nn.LayerNorm(width)

    def forward(self, h: Tensor) -> Tensor:  # (B, N, D) -> (B, N, d)
        if self.kind == "gated":
            u = self.down(h).relu()
            return (self.up(u) + u) * self.gate(u).sigmoid()
        if self.kind == "linear_norm":
            return self.norm(self.down(h))
        return self.down(h.relu())  # CLIP4Clip: s = W ReLU(h)


@register_strategy("sherl")
class SHERL(AdaptationStrategy):
    """SHERL (Diao et al., ECCV 2024, arXiv:2407.07523): early anti-redundancy route + late pretrained blocks.

    Early route (no gradient through the trunk): the embedding output and the outputs of every block before the
    late route, h_0..h_K, are computed under ``no_grad``; per-layer projections s_i = phi_i(h_i) are merged per
    token with weights that favour layers relevant to the guide g = s_K and down-weight layers redundant with the
    other shallow ones; the merge goes back to width D as ``y = W_o ReLU(z) + b_o + tanh(gamma / tau) * h_K`` with
    gamma starting at 0. Late route: y runs through the last ``late_blocks`` pretrained blocks (frozen by default;
    their activations are stored so the gradient reaches the early route), the final norm, pooling and the head.
    On padded text batches the early route works per token and the late blocks and pooling read the padding mask
    that ``hidden_states`` took from the batch, so padded positions never reach a real one.

    Args:
        late_blocks: how many of the last pretrained blocks form the late route (the official code uses 1).
        tune_late_blocks: train the late blocks too (the released code keeps them frozen).
        reduction: the early route's width is ``embed_dim // reduction`` (4 for T5, 2 for CLIP-ViL and VSE).
        projection: the per-layer projection phi: ``gated`` (CLIP-ViL/T5), ``linear_norm`` (VSE BERT) or
            ``relu_linear`` (CLIP4Clip).
        shallow_layers: which hidden states 0..K-1 form the shallow set (default: all of them; K = depth -
            late_blocks is always the guide).
        gate_temperature: tau of the ``tanh(gamma / tau)`` gate on the copy of h_K.
    """

    identity_at_init = False
    needs_tokens = True

    def __init__(
        self,
        late_blocks: int = 1,
        tune_late_blocks: bool = False,
        reduction: int = 4,
        projection: Literal["gated", "linear_norm", "relu_linear"] = "gated",
        shallow_layers: Sequence[int] | None = None,
        gate_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if late_blocks < 1:
            raise ValueError(f"late_blocks must be >= 1 (the late route needs a pretrained block), got {late_blocks}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if projection not in ("gated", "linear_norm", "relu_linear"):
            raise ValueError(f"projection must be 'gated', 'linear_norm' or 'relu_linear', got {projection!r}")
        if gate_temperature <= 0:
            raise ValueError(f"gate_temperature must be > 0, got {gate_temperature}")
        self.late_blocks = late_blocks
        self.tune_late_blocks = tune_late_blocks
        self.reduction = reduction
        self.projection = projection
        self.shallow_layers = list(shallow_layers) if shallow_layers is not None else None
        self.gate_temperature = gate_temperature
        self.projections = nn.ModuleList()  # phi_i for the shallow layers, then the guide; built in attach
        self.score = nn.Linear(1, 1)
        self.out = nn.Linear(1, 1)
        self.gamma = nn.Parameter(torch.zeros(()))  # gate logit, 0 at init: y holds no copy of h_K yet

    def _layers(self, backbone: Backbone) -> list[int]:
        guide = backbone.depth - self.late_blocks
        shallow = list(range(guide)) if self.shallow_layers is None else self.shallow_layers
        return [*shallow, guide]

    def check_backbone(self, backbone: Backbone) -> None:
        super().check_backbone(backbone)
        if self.late_blocks >= backbone.depth:
            raise ValueError(f"late_blocks={self.late_blocks} leaves no block for the early route of "
                             f"{backbone.identity()} (depth {backbone.depth}): use 1..{backbone.depth - 1}")
        guide = backbone.depth - self.late_blocks
        bad = [i for i in self.shallow_layers or [] if not 0 <= i < guide]
        if bad or (self.shallow_layers is not None and len(set(self.shallow_layers)) != len(self.shallow_layers)):
            raise ValueError(f"shallow_layers {self.shallow_layers} must be distinct hidden-state indices in "
                             f"[0, {guide - 1}] (0 = embedding, {guide} = the guide) for {backbone.identity()}")
        if not self._layers(backbone)[:-1]:
            raise ValueError("SHERL needs at least one shallow layer: set shallow_layers or fewer late_blocks")

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        if self.tune_late_blocks:
            for i in range(backbone.depth - self.late_blocks, backbone.depth):
                backbone.blocks[i].requires_grad_(True)
        dim = backbone.embed_dim
        width = max(1, dim // self.reduction)
        self.projections = nn.ModuleList(_Projection(dim, width, self.projection) for _ in self._layers(backbone))
        self.score = nn.Linear(width, 1)
        self.out = nn.Linear(width, dim)
        # a small output projection: at init the late block reads only this (the gate is closed), see the notes
        nn.init.trunc_normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def early_route(self, hidden: Sequence[Tensor]) -> Tensor:
        """Frozen hidden states of the chosen layers (shallow..., guide), each (B, N, D) -> y (B, N, D)."""
        projected = [phi(h) for phi, h in zip(self.projections, hidden)]  # each (B, N, d)
        shallow, guide = torch.stack(projected[:-1]), projected[-1]  # (L, B, N, d), (B, N, d)
        weights = anti_redundancy_weights(shallow, guide, self.score.weight[0], self.score.bias[0])  # (L, B, N)
        z = aggregate(shallow, guide, weights)  # (B, N, d)
        return self.out(z.relu()) + torch.tanh(self.gamma / self.gate_temperature) * hidden[-1]

    def features(self, backbone: Backbone, inputs: Tensor) -> Tensor:
        start = backbone.depth - self.late_blocks
        states = backbone.hidden_states(inputs, num_blocks=start)  # h_0..h_K under no_grad, each (B, N, D)
        tokens = self.early_route([states[i] for i in self._layers(backbone)])
        for i in range(start, backbone.depth):  # the late route: stored for backward, frozen unless tuned
            tokens = backbone.run_block(i, tokens)
        return backbone.pool(backbone.finalize(tokens))  # (B, num_features)

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        assert head is not None
        return head(self.features(backbone, inputs))

    def set_train_mode(self, backbone: Backbone, head: nn.Module | None, mode: bool) -> None:
        super().set_train_mode(backbone, head, mode)  # the frozen trunk: eval (dropout and drop-path off)
        if mode and self.tune_late_blocks:  # the late blocks it trains keep their dropout and drop-path
            for i in range(backbone.depth - self.late_blocks, backbone.depth):
                backbone.blocks[i].train(True)
