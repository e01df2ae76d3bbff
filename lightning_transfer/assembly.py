"""How a model is put together from its parts: backbone + adaptation strategy + head, the strategy attached.

Shared by :class:`~lightning_transfer.module.TransferModule` and by what rebuilds a fit's network without the
Lightning module around it (a teacher or old model from a fit checkpoint, ``auxiliary.frozen_network``).
"""

from __future__ import annotations

from typing import Any

from lightning_transfer._config import build_component
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.heads import Head, LinearHead
from lightning_transfer.strategies.base import AdaptationStrategy
from lightning_transfer.strategies.linear_probe import LinearProbe


def assemble(backbone: Backbone | dict[str, Any], adaptation: AdaptationStrategy | dict[str, Any] | None,
             num_classes: int, class_names: list[str] | None, head: Head | dict[str, Any] | None,
             head_dropout: float = 0.0) -> tuple[Backbone, AdaptationStrategy, Head | None]:
    """(backbone, strategy, head) built from objects or their recorded class_path/init_args configs, the head sized
    for the strategy's features (None when the strategy classifies without one, as CLIP prompts do), and the
    strategy attached (frozen/unfrozen, modules injected)."""
    net: Backbone = build_component(backbone, Backbone)
    strategy: AdaptationStrategy = build_component(adaptation, AdaptationStrategy) or LinearProbe()
    built_head: Head | None = build_component(head, Head)
    if class_names is not None and num_classes and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}; they must agree")
    in_features = strategy.head_in_features(net)
    if in_features is None:
        built_head = None
    else:
        built_head = built_head if built_head is not None else LinearHead(dropout=head_dropout)
        built_head.build(in_features, num_classes)
    strategy.set_class_names(class_names)  # strategies that build their classifier from names (CLIP)
    strategy.attach(net, built_head)
    return net, strategy, built_head
