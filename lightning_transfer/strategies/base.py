"""AdaptationStrategy: how a pretrained backbone is adapted (what trains, what is injected, how it runs).

A strategy is an ``nn.Module``, so its own parameters (LoRA matrices, query tokens, prompts) are part of the
LightningModule: they checkpoint, move devices and are wrapped by DDP with everything else. The backbone and the
head belong to :class:`~lightning_transfer.module.TransferModule`; a strategy receives them as arguments and never
registers them as its own submodules.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_transfer._config import RecordsInitArgs
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import STRATEGIES

# parameters that never get weight decay, by a whole component of their name: learned tokens and positions (timm's
# ``no_weight_decay()`` names, OpenAI's and Hugging Face's position tables, BERT's token-type table), VQT's query
# tokens and CoOp's context vectors. Whole components, not substrings: BERT's attention ``query`` projection, and the
# LoRA matrices on it, are decayed like ``key`` and ``value``.
_NO_DECAY_COMPONENTS = frozenset({"cls_token", "dist_token", "reg_token", "mask_token", "pos_embed",
                                  "positional_embedding", "position_embedding", "position_embeddings",
                                  "token_type_embeddings", "queries", "ctx"})


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def no_weight_decay(name: str, param: Tensor) -> bool:
    """Biases, norm affine parameters, learned tokens and positions are not decayed (timm/BEiT convention)."""
    return param.ndim <= 1 or any(part in _NO_DECAY_COMPONENTS or part.endswith("_token") for part in name.split("."))


class AdaptationStrategy(nn.Module, RecordsInitArgs):
    """Base class of every adaptation strategy; subclasses override :meth:`attach` and optional hooks.

    Capability flags are class attributes read by the module, the CLI and the tests.
    """

    #: logits before any optimisation step equal the frozen backbone + head
    identity_at_init: ClassVar[bool] = True
    #: needs a token backbone (ViT/CLIP/BERT) rather than CNN stages
    needs_tokens: ClassVar[bool] = False
    #: needs a CLIP-style text tower and class names
    needs_text_tower: ClassVar[bool] = False
    #: backbone weights train (so the backbone runs in train mode and gets gradients)
    trains_backbone: ClassVar[bool] = False
    #: some trainable parameters may get no gradient in a step (DDP must then look for unused parameters)
    may_have_unused_parameters: ClassVar[bool] = False
    #: nothing trains (e.g. zero-shot CLIP): validate/test only, ``fit`` refuses
    trains_nothing: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._attached_to: int | None = None

    # ---- construction -------------------------------------------------------------------------------------
    def check_backbone(self, backbone: Backbone) -> None:
        """Fail at construction, naming the strategies that do work, when this one cannot run on ``backbone``."""
        if self.needs_tokens and not backbone.has_tokens:
            usable = [cls.__name__ for _, cls in STRATEGIES.items()
                      if not cls.needs_tokens and not cls.needs_text_tower]
            raise ValueError(
                f"{type(self).__name__} needs a token backbone (ViT/CLIP/BERT); got {backbone.identity()}, which has "
                f"CNN stages - use one of: {', '.join(usable)}"
            )

    def attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        """Freeze/unfreeze, inject modules and create parameters. Called once by the module; idempotent."""
        if self._attached_to == id(backbone):
            return
        self.check_backbone(backbone)
        self._attach(backbone, head)
        self._attached_to = id(backbone)

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        """Default: the backbone is frozen, the head trains."""
        freeze(backbone)

    def set_class_names(self, class_names: list[str] | None) -> None:
        """Receive the task's class names (before :meth:`attach`, and again when they change). No-op by default."""

    def head_in_features(self, backbone: Backbone) -> int | None:
        """Width of the head's input; ``None`` when the strategy needs no linear head (e.g. CLIP prompts)."""
        return backbone.num_features

    def check_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        """Raise a ``ValueError`` saying why a checkpoint's strategy tensors (``state``, names without the
        ``adaptation.`` prefix) cannot load, before the generic key and shape check. No-op by default."""

    # ---- running ------------------------------------------------------------------------------------------
    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        """inputs (B, C, H, W) -> logits (B, num_classes)."""
        assert head is not None
        return head(backbone(inputs))

    def features(self, backbone: Backbone, inputs: Tensor) -> Tensor:
        """The features the head reads (used by test-time methods and probes)."""
        return backbone(inputs)

    def loss(self, logits: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(logits, batch[1])

    def set_train_mode(self, backbone: Backbone, head: nn.Module | None, mode: bool) -> None:
        """Called after ``module.train(mode)``: a frozen backbone stays in eval mode (dropout off, BN frozen)."""
        if mode and not self.trains_backbone:
            backbone.eval()

    # ---- optimisation -------------------------------------------------------------------------------------
    def named_trainable(self, backbone: Backbone, head: nn.Module | None) -> Iterator[tuple[str, nn.Parameter]]:
        modules: dict[str, nn.Module | None] = {"backbone": backbone, "adaptation": self, "head": head}
        for prefix, module in modules.items():
            if module is None:
                continue
            for name, p in module.named_parameters():
                if p.requires_grad:
                    yield f"{prefix}.{name}", p

    def param_groups(self, backbone: Backbone, head: nn.Module | None) -> list[dict[str, Any]]:
        """Optimizer parameter groups: every trainable parameter; no weight decay on biases, norms and tokens.

        A group may carry ``lr_scale``; the module multiplies the optimizer's learning rate by it.
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.named_trainable(backbone, head):
            (no_decay if no_weight_decay(name, p) else decay).append(p)
        groups: list[dict[str, Any]] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def extra_repr(self) -> str:
        args = self.init_config()["init_args"]
        return ", ".join(f"{k}={v!r}" for k, v in args.items())


@torch.no_grad()
def frozen_features(backbone: Backbone, inputs: Tensor) -> Tensor:
    """Pooled features of a frozen backbone without recording anything for backward."""
    return backbone(inputs)
