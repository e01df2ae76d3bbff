"""Head: what maps the features a strategy gives to the task's outputs, and the closed-form fitting hook.

A head is configured by its hyperparameters (``model.head``) and sized by the module: :meth:`Head.build` receives
the feature width and the number of classes once, in ``TransferModule.__init__``, so a checkpoint reloads with
``strict=True``. A head that :attr:`~Head.fits_in_closed_form` (ridge, nearest class mean, Gaussian statistics) is
fitted from one pass over the frozen training features before any gradient step; the module calls
:func:`fit_closed_form_head` for it, and under DDP the features of every process are gathered first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Protocol

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_transfer import distributed
from lightning_transfer._config import RecordsInitArgs


class Head(nn.Module, RecordsInitArgs):
    """Base class of heads: (B, in_features) features -> (B, num_outputs) outputs (logits, scores, embeddings)."""

    #: fitted from the training features in one pass (:meth:`fit`) before, or instead of, gradient steps
    fits_in_closed_form: ClassVar[bool] = False
    fitted: Tensor  # a buffer, registered only where fits_in_closed_form

    def __init__(self) -> None:
        super().__init__()
        self.in_features = 0
        self.num_classes = 0
        if self.fits_in_closed_form:  # set by fit() and saved with the head: a resumed model is not fitted again
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def build(self, in_features: int, num_classes: int) -> None:
        """Create the parameters for ``in_features`` inputs and ``num_classes`` classes. Called once by the module."""
        if num_classes < 1:
            raise ValueError(
                f"num_classes must be >= 1, got {num_classes}: set model.num_classes or use a datamodule that "
                "provides it (the CLI links data.num_classes into the model)"
            )
        self.in_features, self.num_classes = int(in_features), int(num_classes)

    def fit(self, features: Tensor, targets: Tensor) -> None:
        """Closed form from every training sample: features (N, in_features), targets (N,). Heads that
        :attr:`fits_in_closed_form` override it and call ``super().fit`` (which marks the head fitted)."""
        self.fitted.fill_(True)


class _LabelledModel(Protocol):
    """What :func:`fit_closed_form_head` needs of a model (TransferModule has it)."""

    backbone: Any
    adaptation: Any
    head: Any  # Head | None

    @property
    def device(self) -> torch.device: ...


@torch.no_grad()
def training_features(model: _LabelledModel, batches: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """(features (N, D), targets (N,)) of the labelled training samples, in eval mode, gathered across processes."""
    was_training = model.backbone.training
    model.backbone.eval()
    features, targets = [], []
    try:
        for batch in batches:
            inputs, labels = model.adaptation.labelled_batch(move_data_to_device(batch, model.device))
            features.append(model.adaptation.features(model.backbone, inputs).float())
            targets.append(labels)
    finally:
        model.backbone.train(was_training)
    if not features:
        raise ValueError("the training split is empty: a closed-form head needs its features (check data.*)")
    return distributed.gather_rows(torch.cat(features)), distributed.gather_rows(torch.cat(targets))


def fit_closed_form_head(model: _LabelledModel, batches: Iterable[Any]) -> bool:
    """Fit ``model.head`` from the training features when it fits in closed form and is not fitted yet (a resumed
    fit's head is); True if it did. Every process must call it (the features are gathered)."""
    head = model.head
    if head is None or not head.fits_in_closed_form or bool(head.fitted):
        return False
    head.fit(*training_features(model, batches))
    return True
