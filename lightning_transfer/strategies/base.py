"""AdaptationStrategy: how a pretrained backbone is adapted (what trains, what is injected, how it runs).

A strategy is an ``nn.Module``, so its own parameters (LoRA matrices, query tokens, prompts) are part of the
LightningModule: they checkpoint, move devices and are wrapped by DDP with everything else. The backbone and the
head belong to :class:`~lightning_transfer.module.TransferModule`; a strategy receives them as arguments and never
registers them as its own submodules.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_transfer._config import RecordsInitArgs
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.frozen import FrozenNetwork
from lightning_transfer.outputs import StepLoss
from lightning_transfer.registry import STRATEGIES


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def no_weight_decay(name: str, param: Tensor, names: Collection[str] = ()) -> bool:
    """Biases, norm affine parameters, learned tokens and positions are not decayed (timm/BEiT convention).

    ``names`` are whole components of parameter names that are never decayed: the backbone's token and position
    tables and the strategy's own tokens (:attr:`AdaptationStrategy.no_weight_decay_names`). Whole components, not
    substrings: BERT's attention ``query`` projection, and the LoRA matrices on it, are decayed like ``key``.
    """
    return param.ndim <= 1 or any(part in names or part.endswith("_token") for part in name.split("."))


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
    #: two-stream training: each training batch is ``{"source": (x, y), "target": x_t}``, a labelled source batch
    #: and an unlabelled target batch (a paired datamodule yields it; the CLI refuses any other pairing)
    needs_target_data: ClassVar[bool] = False
    #: whole components of this strategy's parameter names that are never weight-decayed (prompt or query tokens)
    no_weight_decay_names: ClassVar[frozenset[str]] = frozenset()

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
        if not self.needs_text_tower:  # image strategies: what the image forward never uses gets no gradient
            for name, p in backbone.named_parameters():
                if name.startswith(backbone.unused_by_forward()):
                    p.requires_grad_(False)
        for network in self.frozen_networks().values():
            freeze(network)
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
        """The loss of logits on the labelled batch (default: cross-entropy)."""
        return F.cross_entropy(logits, self.labelled_batch(batch)[1])

    def labelled_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of a training batch's labelled samples: the source stream of a two-stream batch."""
        if self.needs_target_data:
            inputs, targets = batch["source"][:2]
            return inputs, targets
        return batch[0], batch[1]

    def training_loss(self, backbone: Backbone, head: nn.Module | None, batch: Any) -> StepLoss:
        """The training step's loss (and any named terms to log) from whatever the datamodule yields.

        Default: :meth:`loss` of :meth:`forward` on the labelled inputs. Two-stream strategies (domain
        adaptation) read ``batch["source"]`` and ``batch["target"]``; distillation runs its teacher here.
        """
        inputs, targets = self.labelled_batch(batch)
        logits = self(backbone, head, inputs)
        return StepLoss(self.loss(logits, batch), logits=logits, targets=targets)

    # ---- auxiliary networks ---------------------------------------------------------------------------------
    def frozen_networks(self) -> dict[str, FrozenNetwork]:
        """Frozen auxiliary networks of this strategy (a teacher, an old model), by attribute path. Like the frozen
        backbone they are left out of checkpoints, identified by a digest that is checked on reload."""
        found: dict[str, FrozenNetwork] = {}
        for name, m in self.named_modules():  # parents come before their children: keep the outermost
            if isinstance(m, FrozenNetwork) and not any(name.startswith(f"{outer}.") for outer in found):
                found[name] = m
        return found

    def trainable_auxiliaries(self) -> dict[str, nn.Module]:
        """Trainable auxiliary modules (a domain discriminator, a projector), by name: saved in checkpoints, and
        given their own optimizer parameter group named after them. None by default."""
        return {}

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
        """Optimizer parameter groups: every trainable parameter; no weight decay on biases, norms and tokens; each
        trainable auxiliary module (:meth:`trainable_auxiliaries`) in groups of its own, named after it.

        A group may carry ``lr_scale``; the module multiplies the optimizer's learning rate by it.
        """
        owner = {id(p): name for name, m in self.trainable_auxiliaries().items() for p in m.parameters()}
        names = self.no_weight_decay_names | backbone.no_weight_decay_names
        grouped: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.named_trainable(backbone, head):
            grouped.setdefault((owner.get(id(p), ""), no_weight_decay(name, p, names)), []).append(p)
        groups: list[dict[str, Any]] = []
        for (aux, undecayed), params in sorted(grouped.items()):  # the model's own groups first, decayed first
            group: dict[str, Any] = {"params": params}
            if undecayed:
                group["weight_decay"] = 0.0
            if aux:
                group["name"] = aux
            groups.append(group)
        return groups

    def extra_repr(self) -> str:
        args = self.init_config()["init_args"]
        return ", ".join(f"{k}={v!r}" for k, v in args.items())


@torch.no_grad()
def frozen_features(backbone: Backbone, inputs: Tensor) -> Tensor:
    """Pooled features of a frozen backbone without recording anything for backward."""
    return backbone(inputs)
