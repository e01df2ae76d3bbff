"""Running a test-time method through ``trainer.test``: prepare once, reset between test sets, hand the model back.

The module owns one :class:`TestTimeSession` and delegates to it from its test hooks; the session is the only code
that orders the method's hooks, so every method gets the same protocol.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_transfer.test_time.base import AdaptableModel, TestTimeAdaptation


class TestTimeSession:
    """The state of one model's test-time adaptation across ``trainer.test`` calls."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.prepared = False
        self.dataloader = 0

    def start(self, method: TestTimeAdaptation | None, model: AdaptableModel, datamodule: Any) -> None:
        """Before testing: the method's :meth:`~TestTimeAdaptation.prepare`, once until :meth:`end`."""
        self.dataloader = 0
        if method is not None and not self.prepared:
            method.prepare(model, datamodule)
            self.prepared = True

    def end(self, method: TestTimeAdaptation | None, model: AdaptableModel) -> None:
        """After testing: hand the model back unadapted (weights, ``requires_grad``, BatchNorm tracking), so a second
        ``trainer.test`` in this process starts from the source model, not from where this one's adaptation ended."""
        if method is not None and self.prepared:
            method.release(model)
            self.prepared = False

    def predict(self, method: TestTimeAdaptation, model: AdaptableModel, batch: Any, dataloader_idx: int) -> Tensor:
        """The method's prediction for a test batch (made before its update), detached."""
        if dataloader_idx != self.dataloader and method.reset_between_dataloaders:
            method.reset()  # the next test set (e.g. the next corruption type)
        self.dataloader = dataloader_idx
        if method.needs_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(method).__name__} takes gradient steps at test time but the Trainer runs test in inference "
                "mode: set trainer.inference_mode=false (the CLI does this whenever model.test_time is set)")
        with torch.enable_grad():
            return method.adapt(model, batch).detach()
