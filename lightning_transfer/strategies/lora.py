"""LoRA: low-rank updates of frozen weights, injected in place by peft (query/value by default, as in the paper)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies._peft import (
    PeftInjected,
    expand_targets,
    qv_targets,
)
from lightning_transfer.strategies.base import freeze


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on ``B A``: ``alpha / r`` (Hu et al.) or ``alpha / sqrt(r)`` (rsLoRA, arXiv:2312.03732)."""
    return alpha / (r ** 0.5 if use_rslora else r)


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """Effective weight update ``scaling * B @ A``: A (r, D_in), B (D_out, r) -> (D_out, D_in)."""
    return scaling * lora_b @ lora_a


@register_strategy("lora")
class LoRA(PeftInjected):
    """Low-rank adaptation of frozen linear (and conv) weights via peft (LoRA, arXiv:2106.09685; DoRA, 2402.09353).

    ``h = W0 x + (alpha / r) B A dropout(x)`` with ``B = 0`` at init, so the model is unchanged before training.
    peft's layers are injected in place into the backbone, so its ``blocks`` stay valid; only A, B (and DoRA's
    magnitudes) and the head train, and checkpoints hold only those.

    Args:
        r: rank of the update.
        alpha: scaling numerator (``alpha / r``; 8 with r=8 is the VTAB setting, 32 with r=16 He et al.'s NLP one).
        dropout: dropout on the LoRA branch's input.
        target_modules: ``"qv"`` (paper/VTAB setting: query and value projections only; fused timm ``qkv`` layers
            are split so only their q and v rows are adapted), ``"default"`` (the backbone's
            ``lora_target_modules``: every attention and MLP Linear on a ViT), or a list of module-name suffixes
            (Linear or Conv2d layers, e.g. ``["conv1", "conv2"]`` on a ResNet).
        use_dora: DoRA (weight-decomposed LoRA: a trained magnitude per output row).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero) or ``"gaussian"`` (A normal 1/r, B zero); peft's
            data-driven inits (PiSSA, OLoRA, LoftQ) rewrite the frozen weights and are not offered.
        layers_to_transform: adapt only these block indices (``None``: every block).
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "qv",
        use_dora: bool = False,
        use_rslora: bool = False,
        init_lora_weights: bool | Literal["gaussian"] = True,
        layers_to_transform: list[int] | None = None,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}; alpha = r keeps the update scale at 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if init_lora_weights not in (True, "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not offered: use True or 'gaussian' (both "
                             "start at B = 0, so the model is unchanged at init)")
        if isinstance(target_modules, str) and target_modules not in ("qv", "default"):
            raise ValueError(f"target_modules={target_modules!r}: use 'qv', 'default' or a list of module names")
        if isinstance(target_modules, list) and not target_modules:
            raise ValueError("target_modules is an empty list: name at least one module, or use 'qv' / 'default'")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = target_modules
        self.use_dora, self.use_rslora = use_dora, use_rslora
        self.init_lora_weights = init_lora_weights
        self.layers_to_transform = layers_to_transform
        self.peft_config: Any = None

    def resolve_targets(self, backbone: Backbone) -> list[str]:
        """The module names peft will adapt (splitting fused qkv layers for ``"qv"``)."""
        if self.target_modules == "qv":
            targets = qv_targets(backbone)
        elif self.target_modules == "default":
            targets = backbone.lora_target_modules
        else:
            targets = list(self.target_modules)
        if not targets:
            raise ValueError(f"{backbone.identity()} suggests no LoRA target modules: pass target_modules as a list "
                             "of Linear/Conv2d module names")
        return expand_targets(backbone, targets, self.layers_to_transform, "LoRA target_modules")

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        freeze(backbone)
        targets = self.resolve_targets(backbone)
        self.peft_config = LoraConfig(
            # peft annotates lora_alpha as int but computes the scaling in float
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,  # type: ignore[arg-type]
            use_dora=self.use_dora, use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights,
        )
        inject_adapter_in_model(self.peft_config, backbone)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

