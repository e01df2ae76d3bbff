"""BN-adapt: normalise with the test batch's statistics instead of the source running statistics."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_transfer import distributed
from lightning_transfer.registry import register_test_time
from lightning_transfer.test_time._norm import (
    check_test_batch_size,
    find_norm_layers,
    restore_tracking,
    tracking_state,
    use_batch_statistics,
)
from lightning_transfer.test_time.base import AdaptableModel, TestTimeAdaptation


@register_test_time("bn_adapt")
class BNAdapt(TestTimeAdaptation):
    """Test-time BatchNorm statistics, no gradient (Schneider et al. 2020, arXiv 2006.16971; Tent's "norm").

    Every BatchNorm layer of the model normalises each test batch with that batch's own mean and variance; nothing
    is learned, so the method has no state to reset and needs no gradients. The source running statistics stay in
    the model (and the checkpoint) untouched. Small test batches hurt: keep the batch size fixed when comparing.

    Args:
        episodic: accepted for a uniform interface; BN-adapt keeps no state between batches.
        reset_between_dataloaders: accepted for a uniform interface (nothing to reset).
    """

    needs_grad: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"batch_norm"})

    def __init__(self, episodic: bool = False, reset_between_dataloaders: bool = True) -> None:
        super().__init__(episodic, reset_between_dataloaders)
        self.layers: list[nn.Module] = []
        self._tracking: list[tuple[nn.Module, bool]] = []

    def check(self, module: AdaptableModel) -> None:
        self._batch_norms(module)

    @staticmethod
    def _batch_norms(module: AdaptableModel) -> list[nn.Module]:
        _, layers = find_norm_layers(module, "batch")
        if not layers:
            raise ValueError(
                f"BNAdapt needs BatchNorm layers but {type(module.backbone).__name__} has none (LayerNorm already "
                "normalises each sample on its own): use Tent, which adapts LayerNorm affine parameters on ViTs"
            )
        return layers

    def prepare(self, module: AdaptableModel, datamodule: Any) -> None:
        self.layers = self._batch_norms(module)
        check_test_batch_size(self, "batch", datamodule)
        self._tracking = tracking_state(self.layers)
        use_batch_statistics(self.layers)

    def release(self, module: AdaptableModel) -> None:
        restore_tracking(self._tracking)
        self._tracking = []

    def adapt(self, module: AdaptableModel, batch: Any) -> Tensor:
        if not self.layers:
            raise RuntimeError("BNAdapt.adapt called before prepare(module, datamodule)")
        use_batch_statistics(self.layers)  # Lightning may have called eval() since the last batch
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        # under DDP, the statistics of the batch all processes see together (as one process with the global batch)
        with torch.no_grad(), distributed.global_batch_statistics(self.layers):
            return module(inputs)  # (B, C)
