"""timm models as Backbones: Vision Transformers expose tokens and blocks, CNNs expose their stages."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import timm
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone, load_into, read_state_dict
from lightning_transfer.registry import register_backbone


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
        if model_name not in timm.list_models() and not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name.split('.')[0][:8]}*")[:8]
            raise ValueError(f"unknown timm model_name {model_name!r}; similar names: {close or 'none'}")
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **(model_kwargs or {}))
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
        cfg["input_size"] = tuple(cfg["input_size"])
        channels = cfg["input_size"][0]
        for key in ("mean", "std"):
            value = tuple(cfg[key])
            if len(value) != channels:  # e.g. a 1-channel model with ImageNet's 3-channel statistics
                value = (sum(value) / len(value),) * channels
            cfg[key] = value
        return cfg

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def identity(self) -> str:
        source = self.checkpoint_path or ("pretrained" if self.pretrained else "random init")
        return f"timm:{self.name} ({source})"
