"""Adapter: bottleneck adapters in the placements of He et al.'s unified view (Houlsby, AdaptFormer, FFN-only)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze

Placement = Literal["parallel", "sequential", "ffn"]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """``f(h W_down + b_d) W_up + b_u`` with a zero up-projection, so it outputs exactly 0 at init.

    Args:
        dim: width of the stream it reads and writes.
        bottleneck: inner width m.
        activation: ``relu`` (He et al., AdaptFormer), ``gelu``, ``silu`` or ``tanh``.
        dropout: dropout after the activation (AdaptFormer uses 0.1).
        init: ``lora`` (down-projection Kaiming-uniform, a=sqrt(5)) or ``bert`` (normal, std 0.02); biases and the
            up-projection are zero either way.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0,
                 init: str = "lora") -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(h))))  # (..., D)


def adapted_output(output: Tensor, stream: Tensor, adapter: nn.Module, scale: float) -> Tensor:
    """``output + scale * adapter(stream)``: the one formula of every placement (He et al., arXiv:2110.04366).

    Sequential (Houlsby): ``stream`` is the sublayer's ``output`` itself. Parallel (AdaptFormer): ``stream`` is
    the sublayer's input stream (the post-attention residual stream, not its LayerNorm).
    """
    return output + scale * adapter(stream)


def block_sites(block: nn.Module) -> dict[str, Any]:
    """The block's own submodules an adapter attaches to: ``attn_out`` and ``ffn_out`` (their outputs are
    adapted) and ``ffn_in`` (its input is the post-attention stream x', read by parallel adapters)."""
    if all(hasattr(block, a) for a in ("attn", "mlp", "norm2")):  # timm pre-LN ViT block
        return {"attn_out": block.attn, "ffn_out": block.mlp, "ffn_in": block.norm2}
    attention, output = getattr(block, "attention", None), getattr(block, "output", None)
    if attention is not None and output is not None and hasattr(block, "intermediate"):  # HF BERT-family layer
        return {"attn_out": attention.output.dense, "ffn_out": output.dense, "ffn_in": block.intermediate}
    raise ValueError(f"Adapter does not know where to attach in a {type(block).__name__} block: it supports timm "
                     "ViT blocks (attn/mlp/norm2) and Hugging Face BERT-family layers; use LoRA on other models")


@register_strategy("adapter")
class Adapter(AdaptationStrategy):
    """Bottleneck adapters: Houlsby (arXiv:1902.00751), AdaptFormer (2205.13535), unified view (2110.04366).

    Placements, through hooks on each block's own submodules (no model file is forked):

    * ``sequential`` (Houlsby): after the attention output and after the FFN output, before each residual add:
      ``h <- h + s * Ad(h)``.
    * ``ffn``: the FFN one only (Pfeiffer / VPT's "Adapter" baseline).
    * ``parallel`` (AdaptFormer, scaled PA): beside the FFN, reading the post-attention stream x' (not LN2(x')):
      ``y = x' + MLP(LN2(x')) + s * Ad(x')``.

    In timm blocks the adapter joins the FFN/attention branch before LayerScale and drop-path (both identity in
    plain ViTs); in BERT layers it joins the output projection before dropout, residual and LayerNorm.

    Args:
        bottleneck: inner width m of each adapter (AdaptFormer 64; 8-64 for ViT-B on VTAB).
        placement: ``parallel``, ``sequential`` or ``ffn`` (see above).
        scale: s; ``None`` gives 0.1 for ``parallel`` (AdaptFormer) and 1.0 otherwise (Houlsby).
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
        dropout: dropout inside the adapter (AdaptFormer 0.1).
        init: ``lora`` or ``bert`` initialisation of the down-projection; the up-projection is always zero, so the
            model is unchanged at init.
    """

    needs_tokens = True

    def __init__(
        self,
        bottleneck: int = 64,
        placement: Placement = "parallel",
        scale: float | None = None,
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        dropout: float = 0.0,
        init: Literal["lora", "bert"] = "lora",
    ) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {bottleneck}")
        if placement not in ("parallel", "sequential", "ffn"):
            raise ValueError(f"placement must be 'parallel', 'sequential' or 'ffn', got {placement!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if init not in ("lora", "bert"):
            raise ValueError(f"init must be 'lora' or 'bert', got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if scale is not None and not (math.isfinite(scale) and scale != 0):
            # s = 0 cuts the adapter off: its output is zero and it never gets a gradient
            raise ValueError(f"scale must be a finite non-zero number, got {scale}: use None for the default (0.1 for "
                             "parallel, AdaptFormer; 1.0 otherwise, Houlsby)")
        self.bottleneck, self.placement, self.activation, self.dropout, self.init = (
            bottleneck, placement, activation, dropout, init)
        self.scale = float(scale) if scale is not None else (0.1 if placement == "parallel" else 1.0)
        self.attn_adapters = nn.ModuleList()  # one per block (sequential only)
        self.ffn_adapters = nn.ModuleList()  # one per block
        self._handles: list[RemovableHandle] = []
        self._streams: dict[int, Tensor] = {}  # block index -> x' of the running forward (parallel only)

    def _new(self, dim: int) -> Bottleneck:
        return Bottleneck(dim, self.bottleneck, self.activation, self.dropout, self.init)

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        sites = [block_sites(block) for block in backbone.blocks]  # fails before anything is built
        dim = backbone.embed_dim
        self.ffn_adapters = nn.ModuleList(self._new(dim) for _ in sites)
        self.attn_adapters = nn.ModuleList(self._new(dim) for _ in sites) if self.placement == "sequential" else (
            nn.ModuleList())
        for i, site in enumerate(sites):
            if self.placement == "sequential":
                self._handles.append(site["attn_out"].register_forward_hook(self._sequential_hook(self.attn_adapters[i])))
            if self.placement == "parallel":
                self._handles.append(site["ffn_in"].register_forward_pre_hook(self._tap_hook(i)))
                self._handles.append(site["ffn_out"].register_forward_hook(self._parallel_hook(i)))
            else:
                self._handles.append(site["ffn_out"].register_forward_hook(self._sequential_hook(self.ffn_adapters[i])))

    # ---- hooks --------------------------------------------------------------------------------------------
    def _sequential_hook(self, adapter: nn.Module) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
            return adapted_output(output, output, adapter, self.scale)  # (B, N, D)

        return hook

    def _tap_hook(self, index: int) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            self._streams[index] = inputs[0]  # x' (B, N, D), the FFN sublayer's input stream

        return hook

    def _parallel_hook(self, index: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
            stream = self._streams.pop(index, None)
            if stream is None:
                raise RuntimeError(f"block {index}: the FFN output ran without its input stream being seen; "
                                   "Adapter(placement='parallel') needs the block's own forward")
            return adapted_output(output, stream, self.ffn_adapters[index], self.scale)

        return hook

    def merged_backbone_state(self, backbone: Backbone) -> dict[str, Tensor]:
        raise ValueError("bottleneck adapters add a nonlinear branch that cannot be folded into the backbone's "
                         "weights: use the checkpoint itself (it holds only the adapters and the head), or train "
                         "LoRA for a mergeable model")
