"""VQT: learnable query tokens read every frozen block; their outputs feed a linear head. No trunk backprop."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.checkpointing import read_checkpoint
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze


def vqt_features(cls: Tensor, query_outputs: Sequence[Tensor], pooling: str = "concat",
                 normalize: bool = True) -> Tensor:
    """Head input of VQT: ``[l2(cls), l2(vec(O^1)), ..., l2(vec(O^L))]``.

    Args:
        cls: (B, C) final pooled feature (the final-normed CLS token).
        query_outputs: L tensors (B, T, D), the query outputs of each layer.
        pooling: ``concat`` flattens the T queries of a layer into one T*D piece; ``mean`` averages them (D).
        normalize: scale each piece (the CLS and every layer's piece) to unit L2 norm separately.

    Returns:
        (B, C + L*T*D) for ``concat``, (B, C + L*D) for ``mean``.
    """
    pieces = [cls]
    for out in query_outputs:  # (B, T, D)
        pieces.append(out.flatten(1) if pooling == "concat" else out.mean(1))
    if normalize:
        pieces = [F.normalize(p, dim=-1) for p in pieces]
    return torch.cat(pieces, dim=-1)


def group_lasso_penalty(weight: Tensor) -> Tensor:
    """``sum_j ||W[:, j]||_2`` of a (num_classes, in_features) head: L2 over classes, L1 over input features."""
    return weight.norm(dim=0).sum()


def select_top_features(weight: Tensor, keep_fraction: float) -> Tensor:
    """Indices (ascending) of the ``floor(keep_fraction * in_features)`` inputs with the largest column norm."""
    keep = math.floor(keep_fraction * weight.shape[1])
    if keep < 1:
        raise ValueError(f"keep_fraction={keep_fraction} keeps no feature of {weight.shape[1]}; use a larger fraction")
    scores = weight.detach().norm(dim=0)  # (in_features,)
    return scores.topk(keep).indices.sort().values


def _read_checkpoint_tensors(path: str, keys: Sequence[str], what: str) -> list[Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist: pass the .ckpt of the earlier VQT stage")
    state = read_checkpoint(file, what)
    state = state.get("state_dict", state)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{what} {path!r} holds no {missing}: it must be a checkpoint of a VQT run")
    return [state[k] for k in keys]


@register_strategy("vqt")
class VQT(AdaptationStrategy):
    """Visual Query Tuning (Tu et al., CVPR 2023, arXiv:2212.03220): query tokens summarise every frozen layer.

    In every block, ``num_queries`` learnable tokens read the block's tokens through its frozen attention and MLP;
    the tokens never read them, so the frozen features are unchanged. The query outputs of each layer (after the
    full block) and the final CLS are L2-normalised piece by piece and concatenated into a linear head. The token
    path runs without gradient: only the query rows carry gradients, so nothing of the trunk is stored for backward
    (the official code stores and back-propagates through the whole backbone). Runs on every backbone with
    ``supports_queries``: timm ViTs, the Hugging Face CLIP image tower and BERT-family text encoders (padded
    positions are masked for the queries as for the tokens; the final feature is the backbone's own ``pool``).

    Optional group-lasso feature selection, the paper's 3-stage protocol:

    1. train ``VQT(num_queries=1)`` (checkpoint A);
    2. compress: ``VQT(group_lasso=1e-4, init_from=A)``: a fresh head trained with ``CE + lambda * sum_j
       ||W[:, j]||_2``, queries initialised from A and still trainable (checkpoint B);
    3. select: ``VQT(keep_fraction=0.7, init_from=A, select_features_from=B)``: the head reads only the
       ``floor(0.7 * in_features)`` inputs with the largest column norm in B's head; a fresh head, lambda = 0,
       queries again from A.

    Args:
        num_queries: query tokens T per layer (the paper picks 1, 10 or 20 per task).
        query_dropout: dropout on the query tokens before each block (0.1 in the paper's scripts).
        pooling: ``concat`` (flatten the T outputs of a layer, the default) or ``mean`` (average them).
        normalize_features: L2-normalise the CLS and each layer's piece separately.
        init_scale: queries start as U(-s, s); default ``sqrt(6 / (768 + embed_dim))``, VPT's Xavier formula for
            16x16 RGB patches.
        group_lasso: weight lambda of the group-lasso penalty on the head's input columns (stage 2).
        keep_fraction: fraction of head inputs kept (stage 3); needs ``select_features_from``.
        init_from: a VQT checkpoint whose trained query tokens initialise this run's (stages 2 and 3).
        select_features_from: the stage-2 (group-lasso) checkpoint whose head scores the features.
    """

    identity_at_init = False
    needs_tokens = True
    no_weight_decay_names = frozenset({"queries"})  # the query tokens, like VPT's prompts

    def __init__(
        self,
        num_queries: int = 1,
        query_dropout: float = 0.1,
        pooling: Literal["concat", "mean"] = "concat",
        normalize_features: bool = True,
        init_scale: float | None = None,
        group_lasso: float = 0.0,
        keep_fraction: float | None = None,
        init_from: str | None = None,
        select_features_from: str | None = None,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        if not 0.0 <= query_dropout < 1.0:
            raise ValueError(f"query_dropout must be in [0, 1), got {query_dropout}")
        if init_scale is not None and not init_scale > 0:  # also refuses nan
            raise ValueError(f"init_scale must be > 0 (queries start as U(-init_scale, init_scale)), got {init_scale}: "
                             "use None for VPT's Xavier default")
        if pooling not in ("concat", "mean"):
            raise ValueError(f"pooling must be 'concat' or 'mean', got {pooling!r}")
        if group_lasso < 0:
            raise ValueError(f"group_lasso must be >= 0, got {group_lasso}")
        if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}; use None to keep every feature")
        if (keep_fraction is None) != (select_features_from is None):
            raise ValueError(
                "keep_fraction and select_features_from go together (stage 3 of feature selection): pass the "
                f"group-lasso checkpoint as select_features_from and a keep_fraction; got keep_fraction={keep_fraction}"
                f", select_features_from={select_features_from!r}"
            )
        self.num_queries = num_queries
        self.pooling = pooling
        self.normalize_features = normalize_features
        self.init_scale = init_scale
        self.group_lasso = group_lasso
        self.keep_fraction = keep_fraction
        self.init_from = init_from
        self.select_features_from = select_features_from
        self.query_dropout = nn.Dropout(query_dropout)
        self.queries = nn.Parameter(torch.empty(0))  # (L, T, D), sized in attach

    def check_backbone(self, backbone: Backbone) -> None:
        super().check_backbone(backbone)
        if not backbone.supports_queries:
            raise ValueError(
                f"VQT needs a backbone that runs query tokens (run_block_with_queries); {backbone.identity()} does "
                "not: use a plain timm ViT, a Hugging Face CLIP or a BERT-family encoder, or SHERL, LoRA or "
                "FullFinetune on this backbone"
            )

    def full_in_features(self, backbone: Backbone) -> int:
        """Width of the concatenated features before any selection."""
        per_layer = self.num_queries * backbone.embed_dim if self.pooling == "concat" else backbone.embed_dim
        return backbone.num_features + backbone.depth * per_layer

    def head_in_features(self, backbone: Backbone) -> int:
        full = self.full_in_features(backbone)
        return full if self.keep_fraction is None else math.floor(self.keep_fraction * full)

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        dim = backbone.embed_dim
        scale = self.init_scale if self.init_scale is not None else math.sqrt(6.0 / (768 + dim))
        queries = torch.empty(backbone.depth, self.num_queries, dim).uniform_(-scale, scale)  # (L, T, D), no pos
        if self.init_from is not None:
            (queries,) = _read_checkpoint_tensors(self.init_from, ["adaptation.queries"], "init_from")
            if queries.shape != (backbone.depth, self.num_queries, dim):
                raise ValueError(f"init_from queries have shape {tuple(queries.shape)}, this VQT needs "
                                 f"{(backbone.depth, self.num_queries, dim)}: use the same backbone and num_queries")
        self.queries = nn.Parameter(queries.clone())
        if self.keep_fraction is not None:
            assert self.select_features_from is not None
            (weight,) = _read_checkpoint_tensors(self.select_features_from, ["head.fc.weight"], "select_features_from")
            if weight.shape[1] != self.full_in_features(backbone):
                raise ValueError(f"select_features_from head reads {weight.shape[1]} features, this VQT makes "
                                 f"{self.full_in_features(backbone)}: use the same backbone, num_queries and pooling")
            self.register_buffer("selected_features", select_top_features(weight, self.keep_fraction))
        fc = getattr(head, "fc", None)
        if isinstance(fc, nn.Linear):  # the official head init: Kaiming normal (fan_out), zero bias
            nn.init.kaiming_normal_(fc.weight, mode="fan_out")
            nn.init.zeros_(fc.bias)
        self.__dict__["_head"] = head  # read by the group-lasso loss; not registered (the module owns the head)

    def features(self, backbone: Backbone, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            tokens = backbone.embed(inputs)  # (B, N, D)
        batch = tokens.shape[0]
        outputs = []
        for layer in range(backbone.depth):
            queries = self.query_dropout(self.queries[layer].expand(batch, -1, -1))  # (B, T, D)
            # text backbones mask padded keys with the padding mask that embed() just read
            tokens, out = backbone.run_block_with_queries(layer, tokens, queries)  # (B, N, D), (B, T, D)
            outputs.append(out)
        with torch.no_grad():
            cls = backbone.pool(backbone.finalize(tokens))  # (B, C): final-normed CLS (ViT, CLIP), BERT's pooling
        feats = vqt_features(cls, outputs, self.pooling, self.normalize_features)  # (B, C + L*T*D)
        if self.keep_fraction is not None:
            feats = feats[:, self.selected_features]  # (B, k)
        return feats

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        assert head is not None
        return head(self.features(backbone, inputs))

    def loss(self, logits: Tensor, batch: Any) -> Tensor:
        loss = F.cross_entropy(logits, batch[1])
        head = self.__dict__.get("_head")
        if self.group_lasso > 0 and head is not None:
            loss = loss + self.group_lasso * group_lasso_penalty(head.fc.weight)
        return loss
