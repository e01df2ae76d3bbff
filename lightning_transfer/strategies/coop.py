"""CoOp: learned context vectors in CLIP's text prompt; CLIP itself stays frozen and in eval mode."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.prompts import (
    ClassTokenPosition,
    assemble_prompts,
    clean_class_name,
    clip_logits,
    split_prompt_embeddings,
)
from lightning_transfer.registry import STRATEGIES, register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze

if TYPE_CHECKING:
    from lightning_transfer.backbones.hf_clip import HFCLIPBackbone


def as_clip(backbone: Backbone) -> HFCLIPBackbone:
    """The backbone as a CLIP with a text tower (checked by :func:`check_clip_backbone` at construction)."""
    return cast("HFCLIPBackbone", backbone)


def check_clip_backbone(strategy: AdaptationStrategy, backbone: Backbone) -> None:
    """Fail at construction when ``backbone`` has no CLIP text tower, naming the strategies that do work."""
    if not getattr(backbone, "has_text_tower", False):
        usable = [cls.__name__ for _, cls in STRATEGIES.items() if not cls.needs_text_tower]
        raise ValueError(
            f"{type(strategy).__name__} builds its classifier from CLIP's text tower, but {backbone.identity()} has "
            f"none: use model.backbone=HFCLIPBackbone (e.g. model_name_or_path: openai/clip-vit-base-patch16), or "
            f"a strategy with a linear head: {', '.join(usable)}"
        )


def check_class_names(strategy: AdaptationStrategy, class_names: list[str] | None) -> list[str]:
    if not class_names:
        raise ValueError(
            f"{type(strategy).__name__} builds its classifier from class names, but the model has none: use a "
            "datamodule that provides class_names (the CLI links data.class_names into model.class_names) or pass "
            "model.class_names"
        )
    return [clean_class_name(n) for n in class_names]


@register_strategy("coop")
class CoOp(AdaptationStrategy):
    """CoOp: context optimisation, learned prompt vectors for CLIP (Zhou et al., IJCV 2022; arXiv:2109.01134).

    The prompt of class c is ``[SOS, v_1 ... v_M, name_c, ".", EOT]`` (for ``end``); only the M context vectors
    train, by back-propagation through the whole frozen text tower. The text features of all classes are computed
    once per forward pass (one training step), not per image; the image tower runs without gradients. The logit
    scale is CLIP's own (100 for OpenAI's models).

    Args:
        n_ctx: number of context vectors M (16 in the paper's main setting). With ``ctx_init`` it must equal the
            number of tokens of ``ctx_init`` (4 for "a photo of a").
        ctx_init: initialise the context from the token embeddings of these words (e.g. "a photo of a");
            ``None`` draws it from N(0, ``init_std``^2).
        class_specific: one context per class (CSC); such a context is tied to the training class list, so it
            cannot be evaluated on other classes (base-to-new, cross-dataset). Unlike the official code, which
            ignores CSC when ``ctx_init`` is given, each class's context then starts from ``ctx_init``.
        class_token_position: where the class name goes: ``end``, ``middle`` or ``front``.
        init_std: standard deviation of the random initialisation.
    """

    identity_at_init: ClassVar[bool] = False  # there is no linear head to compare against
    needs_tokens: ClassVar[bool] = True
    needs_text_tower: ClassVar[bool] = True
    no_weight_decay_names: ClassVar[frozenset[str]] = frozenset({"ctx"})  # the context vectors, as CoOp trains them

    def __init__(
        self,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: ClassTokenPosition = "end",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0 (0.02 in the paper), got {init_std}")
        if class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be 'end', 'middle' or 'front', got {class_token_position!r}")
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init.strip() if ctx_init else None
        self.class_specific = class_specific
        self.class_token_position = class_token_position
        self.init_std = init_std
        self.class_names: list[str] | None = None
        self.ctx: nn.Parameter | None
        self.register_parameter("ctx", None)  # created in attach, once the text width and classes are known
        self._parts: dict[str, Any] = {}  # cache of the frozen prompt parts, see _prompt_parts

    # ---- construction -------------------------------------------------------------------------------------
    def check_backbone(self, backbone: Backbone) -> None:
        check_clip_backbone(self, backbone)

    def set_class_names(self, class_names: list[str] | None) -> None:
        names = check_class_names(self, class_names)
        if self.class_specific and self.ctx is not None and self.ctx.shape[0] != len(names):
            raise ValueError(self._tied_contexts(self.ctx.shape[0], names))
        self.class_names = names

    def check_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        ctx = state.get("ctx")  # class-specific: (C, M, D)
        if self.class_specific and ctx is not None and ctx.ndim == 3 and self.class_names is not None \
                and ctx.shape[0] != len(self.class_names):
            raise ValueError("checkpoint " + self._tied_contexts(ctx.shape[0], self.class_names))

    def _tied_contexts(self, trained: int, names: list[str]) -> str:
        return (f"{type(self).__name__}(class_specific=True) learned one context per class for {trained} classes, so "
                f"it cannot classify {len(names)} classes {names[:5]}...: class-specific contexts are tied to the "
                "training class list (CoOp issue #69); train with class_specific=false for base-to-new or "
                "cross-dataset evaluation")
        self._parts = {}  # the class-name token parts are rebuilt for the new names

    def head_in_features(self, backbone: Backbone) -> int | None:
        return None

    def attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        super().attach(backbone, head)
        # tokenise now, and again for new class names (attach is called once per module built on them): a prompt
        # longer than the text context fails at construction, not at the first forward
        self._prompt_parts(backbone)

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        assert self.class_names is not None, "set_class_names runs before attach"
        width = as_clip(backbone).text_width
        rows = len(self.class_names) if self.class_specific else 1
        if self.ctx_init:
            ids = as_clip(backbone).token_ids(self.ctx_init)
            if len(ids) != self.n_ctx:
                raise ValueError(f"ctx_init {self.ctx_init!r} is {len(ids)} tokens but n_ctx={self.n_ctx}: set "
                                 f"n_ctx: {len(ids)} (the context is initialised from those token embeddings)")
            with torch.no_grad():
                init = as_clip(backbone).token_embedding(torch.tensor(ids, device=self._device_of(backbone)))
            ctx = init.detach().clone().float().unsqueeze(0).repeat(rows, 1, 1)  # (rows, M, D)
        else:
            ctx = torch.empty(rows, self.n_ctx, width).normal_(0.0, self.init_std)
        # unified context: (M, D), class-specific: (C, M, D), the shapes of the official checkpoints
        self.ctx = nn.Parameter(ctx if self.class_specific else ctx[0])
        self.extra_init(backbone)

    def extra_init(self, backbone: Backbone) -> None:
        """Hook for subclasses that add modules next to the context (CoCoOp's meta-net)."""

    @staticmethod
    def _device_of(backbone: Backbone) -> torch.device:
        return next(backbone.parameters()).device

    # ---- prompts ------------------------------------------------------------------------------------------
    def placeholder_text(self, name: str) -> str:
        return " ".join(["X"] * self.n_ctx) + f" {name}."

    def _prompt_parts(self, backbone: Backbone) -> dict[str, Any]:
        """Frozen prefix/suffix embeddings, name lengths and EOT positions of the current class names.

        Tokenised once per class list, device and dtype (the tokenizer never runs in the training loop).
        """
        weight = as_clip(backbone).model.text_model.embeddings.token_embedding.weight
        key = (tuple(self.class_names or ()), weight.device, weight.dtype)
        if self._parts.get("key") != key:
            from lightning_transfer.backbones.hf_clip import eot_positions

            assert self.class_names is not None
            ids = as_clip(backbone).tokenize([self.placeholder_text(n) for n in self.class_names])
            ids = ids.to(weight.device)  # (C, L)
            with torch.no_grad():
                embedded = as_clip(backbone).token_embedding(ids)  # (C, L, D)
            prefix, suffix = split_prompt_embeddings(embedded, self.n_ctx)
            self._parts = {
                "key": key, "prefix": prefix, "suffix": suffix,
                "name_lens": [len(as_clip(backbone).token_ids(n)) for n in self.class_names],
                "eot": eot_positions(ids, as_clip(backbone).eos_token_id),
            }
        return self._parts

    def prompts(self, backbone: Backbone, ctx_shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Prompt embeddings (C, L, D) (or (B, C, L, D) with a per-image ``ctx_shift`` (B, D)) and EOT positions."""
        assert self.ctx is not None
        parts = self._prompt_parts(backbone)
        n_cls = len(parts["name_lens"])
        ctx = self.ctx.to(parts["prefix"].dtype)
        ctx = ctx if ctx.ndim == 3 else ctx.unsqueeze(0).expand(n_cls, -1, -1)  # (C, M, D)
        if ctx_shift is None:
            return assemble_prompts(parts["prefix"], ctx, parts["suffix"], parts["name_lens"],
                                    self.class_token_position), parts["eot"]
        per_image = [assemble_prompts(parts["prefix"], ctx + shift, parts["suffix"], parts["name_lens"],
                                      self.class_token_position) for shift in ctx_shift]  # B x (C, L, D)
        return torch.stack(per_image), parts["eot"]

    def text_features(self, backbone: Backbone) -> Tensor:
        """(C, projection_dim) text features of all classes: one pass of the text tower per call."""
        prompts, eot = self.prompts(backbone)
        return as_clip(backbone).encode_text_embeddings(prompts, eot)

    # ---- running ------------------------------------------------------------------------------------------
    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        image = self.features(backbone, inputs)  # (B, E)
        return clip_logits(image, self.text_features(backbone), as_clip(backbone).logit_scale)

    def features(self, backbone: Backbone, inputs: Tensor) -> Tensor:
        with torch.no_grad():  # the image tower is frozen: record nothing for backward
            return as_clip(backbone).encode_image(inputs)  # (B, E)

    def param_groups(self, backbone: Backbone, head: nn.Module | None) -> list[dict[str, Any]]:
        # Dassl's optimizer decays every registered parameter, the context included (weight_decay 5e-4)
        params = [p for _, p in self.named_trainable(backbone, head)]
        return [{"params": params}] if params else []
