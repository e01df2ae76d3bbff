"""ZeroShotCLIP: CLIP's classifier from hand-crafted prompts; nothing trains."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.prompts import clip_logits, resolve_templates
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze
from lightning_transfer.strategies.coop import as_clip, check_class_names, check_clip_backbone


def ensemble_text_features(features: Tensor) -> Tensor:
    """(T, C, E) features of T templates -> (C, E): the mean of the L2-normalised features, re-normalised (CLIP)."""
    features = features / features.norm(dim=-1, keepdim=True)
    mean = features.mean(dim=0)
    return mean / mean.norm(dim=-1, keepdim=True)


@register_strategy("zeroshot_clip")
class ZeroShotCLIP(AdaptationStrategy):
    """Zero-shot CLIP: class-name prompts from templates, no training (Radford et al., 2021; arXiv:2103.00020).

    The text features of every class are computed once (under ``no_grad``) and cached until the class names, the
    device or the dtype change; ``validate``/``test``/``predict`` work without ``fit`` (``fit`` fails: nothing
    trains). As CoOp's baseline, a single template per dataset (``templates: oxford_pets`` gives
    "a photo of a {}, a type of pet."), or an ensemble (``ensemble`` = CLIP's seven selected ImageNet templates;
    ``ensemble:<dataset>`` adds the dataset's own), averaged over normalised text features.

    Args:
        templates: a dataset key (see ``lightning_transfer.prompts.DATASET_TEMPLATES``), ``ensemble``,
            ``ensemble:<dataset>``, one template with ``{}`` for the class name, or a list of templates.
    """

    identity_at_init: ClassVar[bool] = False  # no linear head
    needs_tokens: ClassVar[bool] = True
    needs_text_tower: ClassVar[bool] = True
    #: nothing trains: fit is refused; the contract suite checks evaluation and checkpoints only
    trains_nothing: ClassVar[bool] = True

    def __init__(self, templates: str | list[str] = "a photo of a {}.") -> None:
        super().__init__()
        self.templates = resolve_templates(templates)
        self.class_names: list[str] | None = None
        self._cache: dict[str, Any] = {}

    def check_backbone(self, backbone: Backbone) -> None:
        check_clip_backbone(self, backbone)

    def set_class_names(self, class_names: list[str] | None) -> None:
        self.class_names = check_class_names(self, class_names)
        self._cache = {}

    def head_in_features(self, backbone: Backbone) -> int | None:
        return None

    def attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        super().attach(backbone, head)
        # tokenise now, and again for new class names (the text tower runs on first use): a prompt longer than the
        # text context fails at construction, not at the first forward
        as_clip(backbone).tokenize([p for group in self.prompt_texts() for p in group])

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)

    def prompt_texts(self) -> list[list[str]]:
        """T lists of C prompts: ``[template.format(name) for name in classes]`` per template."""
        assert self.class_names is not None
        return [[t.format(n) for n in self.class_names] for t in self.templates]

    @torch.no_grad()
    def text_features(self, backbone: Backbone) -> Tensor:
        """(C, E) normalised classifier weights, computed on first use and cached."""
        weight = as_clip(backbone).model.logit_scale
        key = (tuple(self.class_names or ()), weight.device, weight.dtype)
        if self._cache.get("key") != key:
            texts = self.prompt_texts()
            ids = as_clip(backbone).tokenize([p for group in texts for p in group]).to(weight.device)
            feats = as_clip(backbone).encode_text(ids)  # (T * C, E)
            self._cache = {"key": key, "features": ensemble_text_features(feats.view(len(texts), -1, feats.shape[-1]))}
        return self._cache["features"]

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        image = self.features(backbone, inputs)  # (B, E)
        return clip_logits(image, self.text_features(backbone), as_clip(backbone).logit_scale)

    @torch.no_grad()
    def features(self, backbone: Backbone, inputs: Tensor) -> Tensor:
        return as_clip(backbone).encode_image(inputs)

    def param_groups(self, backbone: Backbone, head: nn.Module | None) -> list[dict[str, Any]]:
        return []

