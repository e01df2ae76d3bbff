"""timm models as Backbones: Vision Transformers expose tokens and blocks, CNNs expose their stages."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone, load_into, per_channel_stats, read_state_dict
from lightning_transfer.registry import register_backbone


def _query_block_error(block: nn.Module) -> str | None:
    """Why ``block`` cannot run extra query tokens (None when it can): only timm's pre-norm ``Block``/``Attention``."""
    from timm.models.vision_transformer import Attention, Block

    if type(block) is not Block:
        return f"its blocks are {type(block).__name__}, not timm's pre-norm vision_transformer.Block"
    if type(block.attn) is not Attention:
        return f"its attention is {type(block.attn).__name__}, not timm's vision_transformer.Attention"
    return None


def _keys_values(block: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Keys (after k_norm) and values of a timm ViT block's original rows: (B, N, D) -> 2 x (B, H, N, d)."""
    attn = block.attn
    b, n, _ = tokens.shape
    width = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[width:] if attn.qkv.bias is not None else None
    kv = F.linear(block.norm1(tokens), attn.qkv.weight[width:], bias)  # (B, N, 2 * H * d)
    k, v = kv.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.k_norm(k), v


class _QueryAttention(torch.autograd.Function):
    """Attention of query rows over frozen keys/values that saves the block input, not the keys and values.

    Saving k and v would keep 2 x (B, H, N, d) per block (the whole qkv output, as views); the block input
    (B, N, D) is half that, and backward recomputes k and v from it (one extra 2/3 qkv projection per block).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, tokens: Tensor, k: Tensor, v: Tensor, block: nn.Module) -> Tensor:
        device = q.device.type
        ctx.block = block
        # backward runs outside autocast: it recomputes k and v under the forward's autocast state (mixed precision)
        ctx.autocast = device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
        ctx.save_for_backward(q, tokens)
        return F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        q, tokens = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            with torch.no_grad():
                k, v = _keys_values(ctx.block, tokens)
            with torch.enable_grad():
                q = q.detach().requires_grad_(True)
                (dq,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), q, grad)
        return dq, None, None, None, None


def _family(model: nn.Module) -> str:
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "conv1"):
        return "resnet"
    if hasattr(model, "stem") and hasattr(model, "stages"):
        return "stages"
    return "unsupported"


@register_backbone("timm")
class TimmBackbone(Backbone):
    """Any timm Vision Transformer, ResNet or stem+stages CNN (ConvNeXt, RegNet, ...) behind the Backbone contract.

    Args:
        model_name: timm model name, e.g. ``vit_base_patch16_224.augreg_in21k`` or ``resnet50``.
        pretrained: download the pretrained weights from the hub (needs internet).
        checkpoint_path: a local weights file (``.safetensors``, or a torch state dict read with
            ``weights_only=True``) loaded strictly; the classifier keys are ignored.
        model_kwargs: extra arguments for ``timm.create_model`` (``img_size``, ``patch_size``, ``in_chans``,
            ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ...).
        data_config: overrides for the preprocessing config (``input_size``, ``mean``, ``std``, ...).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):  # accepts pretrained tags (name.tag); no scan of the model list
            # closest first over the whole list (a prefix filter cut alphabetically missed vit_tiny_patch16_224 for
            # vit_tiny_patch16_22); this only runs on the error path, so scanning the ~1,300 names costs nothing
            close = difflib.get_close_matches(model_name.split(".")[0], timm.list_models(), n=8, cutoff=0.5)
            raise ValueError(f"unknown timm model_name {model_name!r}; similar names: {close or 'none'}")
        self.model: Any = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **(model_kwargs or {}))
        self.family = _family(self.model)
        if self.family == "unsupported":
            raise ValueError(
                f"timm model {model_name!r} ({type(self.model).__name__}) has no supported block structure; "
                "use a VisionTransformer, a ResNet or a stem+stages CNN (ConvNeXt, RegNet, ...)"
            )
        self.name = model_name
        self.checkpoint_path = checkpoint_path
        self.pretrained = pretrained
        self._data_config_overrides = dict(data_config or {})
        self.num_features = self.model.num_features
        if self.family == "vit":
            self.embed_dim = self.model.embed_dim
            self.num_prefix_tokens = self.model.num_prefix_tokens
            self._block_takes_mask = "attn_mask" in inspect.signature(self.model.blocks[0].forward).parameters
        else:
            self.embed_dim = self.num_features
            self.num_prefix_tokens = 0
        self.data_config()  # a data_config that cannot fit the model fails here, not in the datamodule's setup
        if checkpoint_path is not None:
            classifier = self.model.pretrained_cfg.get("classifier") or "head"
            prefixes = [classifier] if isinstance(classifier, str) else list(classifier)
            load_into(self.model, read_state_dict(checkpoint_path), checkpoint_path, ignore_prefixes=prefixes)

    @property
    def has_tokens(self) -> bool:  # type: ignore[override]
        return self.family == "vit"

    @property
    def final_prefixes(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("model.norm.", "model.fc_norm.", "model.head", "model.attn_pool.") if self.family == "vit" else (
            "model.head",
        )

    def embed(self, x: Tensor) -> Tensor:
        m = self.model
        if self.family == "vit":
            x = m.patch_embed(x)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)  # (B, N, D)
        if self.family == "resnet":
            return m.maxpool(m.act1(m.bn1(m.conv1(x))))  # (B, C, H/4, W/4)
        return m.stem(x)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        m = self.model
        if self.family == "vit":
            return m.blocks
        if self.family == "resnet":
            return [m.layer1, m.layer2, m.layer3, m.layer4]
        return m.stages

    def run_block(self, index: int, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None:
            return self.blocks[index](tokens)
        if not (self.family == "vit" and self._block_takes_mask):
            raise ValueError(f"blocks of {self.name} do not take an attention mask (upgrade timm for ViT masks)")
        return self.blocks[index](tokens, attn_mask=attn_mask)

    @property
    def supports_queries(self) -> bool:  # type: ignore[override]
        return self.family == "vit" and _query_block_error(self.blocks[0]) is None

    def run_block_with_queries(self, index: int, tokens: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """timm ViT block with query tokens, built from the block's own submodules (see the base class).

        The token path is the plain block call itself under ``no_grad`` (so ``tokens_out`` is bit-identical to
        :meth:`run_block`); a hook on ``attn.qkv`` keeps that call's keys and values, which the query rows read.
        For backward only the block input is kept (B, N, D): the keys and values are recomputed from it.
        Attention dropout is not applied to the query rows (the frozen backbone runs in eval mode anyway).
        """
        block = self.blocks[index]
        reason = _query_block_error(block) if self.family == "vit" else "it is a CNN without tokens"
        if reason is not None:
            raise NotImplementedError(f"{self.identity()} cannot run query tokens: {reason}; use a plain timm ViT")
        attn = block.attn
        captured: list[Tensor] = []
        handle = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.no_grad():  # the frozen token path records nothing for backward
                tokens_out = block(tokens)  # (B, N, D), exactly the plain block
        finally:
            handle.remove()
        b, n, _ = tokens.shape
        t = queries.shape[1]
        heads, head_dim = attn.num_heads, attn.head_dim
        width = heads * head_dim
        with torch.no_grad():
            _, k, v = captured[0].reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
            k = attn.k_norm(k)
        # query rows: the q slice of the frozen qkv projection; keys/values come from the original rows only
        h = block.norm1(queries)  # (B, T, D)
        bias = attn.qkv.bias[:width] if attn.qkv.bias is not None else None
        q = F.linear(h, attn.qkv.weight[:width], bias).reshape(b, t, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        q = attn.q_norm(q)
        out = _QueryAttention.apply(q, tokens.detach(), k, v, block)  # (B, H, T, d)
        out = attn.norm(out.transpose(1, 2).reshape(b, t, width))  # (B, T, H*d)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(h).sigmoid()
        out = attn.proj_drop(attn.proj(out))  # (B, T, D)
        queries = queries + block.drop_path1(block.ls1(out))
        queries = queries + block.drop_path2(block.ls2(block.mlp(block.norm2(queries))))
        return tokens_out, queries  # (B, N, D), (B, T, D)

    def finalize(self, tokens: Tensor) -> Tensor:
        if self.family == "vit":
            return self.model.norm(tokens)
        if self.family == "stages":
            return self.model.norm_pre(tokens) if hasattr(self.model, "norm_pre") else tokens
        return tokens

    def pool(self, tokens: Tensor) -> Tensor:
        return self.model.forward_head(tokens, pre_logits=True)  # (B, num_features)

    @property
    def lora_target_modules(self) -> list[str]:
        return ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] if self.family == "vit" else []

    def data_config(self) -> dict[str, Any]:
        cfg = dict(timm.data.resolve_data_config({}, model=self.model))
        if self.family == "vit":  # img_size / in_chans given as model_kwargs change the real input size
            h, w = self.model.patch_embed.img_size
            cfg["input_size"] = (self.model.patch_embed.proj.in_channels, h, w)
        cfg.update(self._data_config_overrides)
        # e.g. a 1-channel model with ImageNet's 3-channel statistics: averaged; a wrong count given is an error, and
        # so is an input_size whose channels the model's stem cannot take (found at the first forward otherwise)
        stem = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        return per_channel_stats(cfg, self._data_config_overrides, f"timm:{self.name}",
                                 model_channels=stem.in_channels if stem is not None else None)

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def identity(self) -> str:
        source = self.checkpoint_path or ("pretrained" if self.pretrained else "random init")
        return f"timm:{self.name} ({source})"

    @property
    def random_init(self) -> bool:
        return not (self.checkpoint_path or self.pretrained)
