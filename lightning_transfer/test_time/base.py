"""TestTimeAdaptation: adapt any trained model on unlabelled test batches (the ``model.test_time`` slot).

Independent of the training strategy: a model trained with FullFinetune, LoRA or LinearProbe can be tested with
any test-time method. The module calls :meth:`prepare` once before testing and :meth:`adapt` for every test batch;
``adapt`` returns the prediction made *before* that batch's update (as Tent does).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from lightning_transfer._config import RecordsInitArgs


class AdaptableModel(Protocol):
    """What a test-time method may use of the model it adapts (AdaptableModel is one): its parts, its forward
    pass and its class count. Test-time methods are typed against this, not against the module."""

    backbone: Any  # lightning_transfer.backbones.Backbone
    adaptation: Any  # lightning_transfer.strategies.AdaptationStrategy
    head: Any  # nn.Module | None
    num_classes: int

    @property
    def device(self) -> torch.device: ...

    def __call__(self, inputs: Tensor) -> Tensor: ...

    def modules(self) -> Any: ...

    def eval(self) -> Any: ...


class TestTimeAdaptation(nn.Module, RecordsInitArgs):
    """Base class of test-time methods.

    Args:
        episodic: restore the initial state before every batch instead of adapting online (continually).
        reset_between_dataloaders: restore the initial state when testing moves on to the next test dataloader
            (e.g. the next corruption type, the Tent/RobustBench protocol); ``False`` adapts continually across them.
    """

    __test__ = False  # not a pytest test class

    #: the method takes gradient steps, so ``trainer.test`` must run with inference mode off
    needs_grad: ClassVar[bool] = True
    #: what the method needs, each refused by :meth:`check` or :meth:`prepare` with the fix when missing:
    #: ``batch_norm`` (BatchNorm layers), ``norm_layers`` (normalisation layers with affine parameters),
    #: ``linear_head`` (a head reading the features, not a classifier built from class names), ``source_data``
    #: (the datamodule's labelled training split at :meth:`prepare`, unless given another way)
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, episodic: bool = False, reset_between_dataloaders: bool = True) -> None:
        super().__init__()
        self.episodic = episodic
        self.reset_between_dataloaders = reset_between_dataloaders

    def check(self, module: AdaptableModel) -> None:
        """Raise ``ValueError`` if this method cannot work on ``module`` (e.g. BNAdapt on a model without BatchNorm).

        Cheap and side-effect free: the module calls it when it is built, so a wrong pairing fails before any data
        is prepared or any checkpoint loaded; :meth:`prepare` calls it again."""

    def prepare(self, module: AdaptableModel, datamodule: Any) -> None:
        """Once, before testing: configure the model, collect statistics, save the state to reset to."""

    def adapt(self, module: AdaptableModel, batch: Any) -> Tensor:
        """Adapt on one unlabelled batch; return the logits predicted before the update."""
        raise NotImplementedError

    def reset(self) -> None:
        """Restore the state saved by :meth:`prepare` (episodic mode, or between corruption types)."""

    def release(self, module: AdaptableModel) -> None:
        """After testing: hand the model back as :meth:`prepare` found it (weights, ``requires_grad``, BatchNorm
        running-statistics tracking), so a later test starts from the source model and a later fit trains as
        configured. The module calls :meth:`prepare` again before its next test."""
        self.reset()

    def fit_state_shapes(self, state: dict[str, Tensor]) -> None:
        """Before loading ``state`` (keys relative to this module): give still-empty buffers the saved shapes.

        Statistics computed in :meth:`prepare` (CAFA's class means and covariances) have shapes that depend on the
        model and data, so they start empty and take their shape from the checkpoint that holds them.
        """
        for name, buffer in list(self.named_buffers()):
            if buffer.numel() == 0 and name in state and state[name].shape != buffer.shape:
                owner = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
                owner.register_buffer(name.rpartition(".")[2], torch.empty_like(state[name], device=buffer.device))
