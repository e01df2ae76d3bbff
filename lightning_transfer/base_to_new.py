"""Evaluation protocols of the CLIP few-shot literature: base-to-new (CoCoOp) and cross-dataset transfer.

Both evaluate a strategy whose classifier is built from class names (ZeroShotCLIP, CoOp, CoCoOp) on classes it
was not trained on: the trained prompt is kept, the class names come from the evaluation datamodule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer

from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.datamodules.class_subset import ClassSubset
from lightning_transfer.module import TransferModule


def harmonic_mean(base: float, new: float) -> float:
    """H = 2 * base * new / (base + new), the base-to-new summary (0 when both are 0)."""
    if base < 0 or new < 0:
        raise ValueError(f"accuracies must be >= 0, got base={base}, new={new}")
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def with_class_names(module: TransferModule, class_names: list[str]) -> TransferModule:
    """A module that classifies ``class_names`` with ``module``'s backbone and a copy of its trained strategy.

    Only strategies without a linear head can do this (their classifier comes from the names). A class-specific
    CoOp context fails clearly when the number of classes differs.
    """
    if module.head is not None:
        raise ValueError(
            f"{type(module.adaptation).__name__} classifies with a linear head trained on {module.num_classes} "
            "classes, so it cannot be evaluated on other class names: use ZeroShotCLIP, CoOp or CoCoOp"
        )
    adaptation = copy.deepcopy(module.adaptation)  # the original keeps its class names
    return TransferModule(module.backbone, adaptation, num_classes=len(class_names), class_names=list(class_names),
                          ece_bins=int(module.hparams.get("ece_bins", 15)))


def evaluate_on(module: TransferModule, datamodule: TransferDataModule, trainer: Trainer) -> dict[str, float]:
    """Test ``module`` on ``datamodule``'s classes (cross-dataset evaluation); returns the test metrics."""
    target = with_class_names(module, datamodule.class_names)
    results = trainer.test(target, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in results[0].items()}


def evaluate_base_to_new(module: TransferModule, data: TransferDataModule,
                         make_trainer: Callable[[], Trainer]) -> dict[str, Any]:
    """Test a prompt trained on ``ClassSubset(data, "base")`` on the base and the new classes; log H.

    Returns ``{"base_acc", "new_acc", "hm"}`` (accuracies in [0, 1]); they are also logged to the loggers of the
    last trainer as ``test/base_acc``, ``test/new_acc`` and ``test/hm``.
    """
    accs = {}
    trainer = None
    for subset in ("base", "new"):
        trainer = make_trainer()
        accs[subset] = evaluate_on(module, ClassSubset(data, subset), trainer)["test/acc"]
    out = {"base_acc": accs["base"], "new_acc": accs["new"], "hm": harmonic_mean(accs["base"], accs["new"])}
    assert trainer is not None
    for logger in trainer.loggers:
        logger.log_metrics({f"test/{k}": v for k, v in out.items()})
    return out
