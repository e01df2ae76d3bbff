"""Text prompts for CLIP: the per-dataset hand-crafted templates of the CoOp code, and prompt assembly for
prompt learners (learned context vectors spliced around the class-name tokens).

Templates follow ``KaiyangZhou/CoOp`` (``trainers/zsclip.py``: ``CUSTOM_TEMPLATES`` and
``IMAGENET_TEMPLATES_SELECT``); dataset keys are lower-case versions of the Dassl dataset names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

ClassTokenPosition = Literal["end", "middle", "front"]

#: the single hand-crafted template per dataset used by CoOp's zero-shot CLIP baseline
DATASET_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "digits": "a photo of the number: \"{}\".",
}

#: the seven ImageNet templates CoOp's ``ZeroshotCLIP2`` ensembles (plus the dataset's own template)
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """A dataset key (``"oxford_pets"``), ``"ensemble"``, ``"ensemble:<dataset>"``, one template or a list.

    ``ensemble:<dataset>`` is CoOp's ``ZeroshotCLIP2``: the seven selected ImageNet templates plus the dataset's own.
    """
    if isinstance(templates, str):
        if templates == "ensemble":
            return list(IMAGENET_TEMPLATES_SELECT)
        if templates.startswith("ensemble:"):
            own = resolve_templates(templates.split(":", 1)[1])
            return list(dict.fromkeys([*IMAGENET_TEMPLATES_SELECT, *own]))
        if templates in DATASET_TEMPLATES:
            return [DATASET_TEMPLATES[templates]]
        templates = [templates]
    out = list(templates)
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise ValueError(
            f"templates {bad or out!r} must each hold exactly one '{{}}' for the class name, or name a dataset: "
            f"{', '.join(sorted(DATASET_TEMPLATES))}, 'ensemble' or 'ensemble:<dataset>'"
        )
    return out


def clean_class_name(name: str) -> str:
    """Dataset folder names to words, as CoOp's datasets do (``"golden_retriever"`` -> ``"golden retriever"``)."""
    return name.replace("_", " ").strip()


def split_prompt_embeddings(embeddings: Tensor, n_ctx: int) -> tuple[Tensor, Tensor]:
    """Embedded ``"X X ... X <name>."`` prompts (C, L, D) -> prefix (C, 1, D) = [SOS], suffix (C, L - 1 - n_ctx, D)."""
    return embeddings[:, :1], embeddings[:, 1 + n_ctx:]


def assemble_prompts(prefix: Tensor, ctx: Tensor, suffix: Tensor, name_lens: Sequence[int],
                     position: ClassTokenPosition) -> Tensor:
    """Splice context vectors around the class-name tokens (CoOp's ``PromptLearner.forward``).

    Args:
        prefix: (C, 1, D) start-of-text embeddings.
        ctx: (C, M, D) context vectors (a unified context expanded over the C classes, or class-specific).
        suffix: (C, S, D) embeddings after the placeholders: class-name tokens, ".", EOT, padding.
        name_lens: the number of class-name tokens of each class.
        position: ``end`` = [SOS, ctx, name, ".", EOT], ``middle`` = [SOS, ctx[:M//2], name, ctx[M//2:], ".", EOT],
            ``front`` = [SOS, name, ctx, ".", EOT].

    Returns:
        (C, 1 + M + S, D) prompt embeddings; the EOT token stays where it was in the tokenised prompt.
    """
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    if position not in ("middle", "front"):
        raise ValueError(f"class_token_position must be 'end', 'middle' or 'front', got {position!r}")
    half = ctx.shape[1] // 2 if position == "middle" else 0
    prompts = []
    for c, n in enumerate(name_lens):
        name, rest = suffix[c:c + 1, :n], suffix[c:c + 1, n:]  # (1, n, D), (1, S - n, D)
        parts = [prefix[c:c + 1], ctx[c:c + 1, :half], name, ctx[c:c + 1, half:], rest]
        prompts.append(torch.cat(parts, dim=1))
    return torch.cat(prompts, dim=0)  # (C, L, D)


def clip_logits(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """(B, E) image and (C, E) text features -> (B, C) ``scale * cos``; (B, C, E) text gives per-image classifiers."""
    image = image_features / image_features.norm(dim=-1, keepdim=True)
    text = text_features / text_features.norm(dim=-1, keepdim=True)
    if text.ndim == 3:  # CoCoOp: one classifier per image
        return logit_scale * torch.einsum("be,bce->bc", image, text)
    return logit_scale * image @ text.t()
