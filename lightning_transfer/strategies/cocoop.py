"""CoCoOp: CoOp's context shifted per image by a small meta-network on the image feature."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.prompts import clip_logits
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.coop import CoOp, as_clip


def meta_net(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """CoCoOp's meta-net: Linear(E -> E/16) -> ReLU -> Linear(E/16 -> D), named as in the official code."""
    return nn.Sequential(OrderedDict([
        ("linear1", nn.Linear(in_features, hidden)),
        ("relu", nn.ReLU(inplace=True)),
        ("linear2", nn.Linear(hidden, out_features)),
    ]))


@register_strategy("cocoop")
class CoCoOp(CoOp):
    """CoCoOp: conditional prompt learning, a context shifted per image (Zhou et al., CVPR 2022; arXiv:2203.05557).

    For an image x with normalised feature f(x), every context vector becomes ``v_m + pi(f(x))`` with the meta-net
    ``pi``; the prompts therefore differ per image and the text tower runs C times per image (B * C prompts per
    step, all in one batched pass). The context and the meta-net train; CLIP stays frozen and in eval mode.
    Official defaults: 4 context vectors from "a photo of a", batch size 1, 10 epochs, SGD lr 0.002.

    Args:
        n_ctx: number of context vectors (4 in the paper; must equal the token count of ``ctx_init``).
        ctx_init: words the context starts from; ``None`` draws it from N(0, ``init_std``^2).
        meta_hidden: hidden width of the meta-net; default ``projection_dim // 16`` (32 for ViT-B/16).
        init_std: standard deviation of the random context initialisation.
    """

    def __init__(
        self,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        meta_hidden: int | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, class_specific=False, class_token_position="end",
                         init_std=init_std)
        if meta_hidden is not None and meta_hidden < 1:
            raise ValueError(f"meta_hidden must be >= 1 or null, got {meta_hidden}")
        self.meta_hidden = meta_hidden
        self.meta_net: nn.Module | None = None

    def extra_init(self, backbone: Backbone) -> None:
        vis_dim = as_clip(backbone).projection_dim
        hidden = self.meta_hidden or max(1, vis_dim // 16)
        self.meta_net = meta_net(vis_dim, hidden, as_clip(backbone).text_width)
        self.meta_net.to(self._device_of(backbone))

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        assert self.meta_net is not None
        image = self.features(backbone, inputs)  # (B, E), no gradient into the image tower
        shift = self.meta_net(image / image.norm(dim=-1, keepdim=True))  # (B, D)
        prompts, eot = self.prompts(backbone, ctx_shift=shift.unsqueeze(1))  # (B, C, L, D)
        b, c, length, d = prompts.shape
        text = as_clip(backbone).encode_text_embeddings(prompts.reshape(b * c, length, d), eot.repeat(b))
        return clip_logits(image, text.view(b, c, -1), as_clip(backbone).logit_scale)

