"""Tent: test-time entropy minimisation on the normalisation affine parameters."""

from __future__ import annotations

from torch import Tensor

from lightning_transfer.registry import register_test_time
from lightning_transfer.test_time._norm import NormAffineAdaptation


def softmax_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) per sample: (B, C) -> (B,)."""
    log_p = logits.log_softmax(dim=1)  # log-softmax, not log(softmax): stable for confident predictions
    return -(log_p.exp() * log_p).sum(dim=1)


@register_test_time("tent")
class Tent(NormAffineAdaptation):
    """Fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021, arXiv 2006.10726).

    For each test batch: normalise with the batch's statistics, predict, take ``steps`` gradient steps on the mean
    prediction entropy, updating only the normalisation affine parameters (gamma, beta), and return the
    prediction made before the update. On CNNs the BatchNorm layers are adapted (as in the official code); on ViTs,
    which have no BatchNorm, the LayerNorm affine parameters are (``norm="auto"`` picks; ``norm="layer"`` forces it).
    Dropout stays off: unlike the official ``model.train()``, only the normalisation layers switch to train mode.

    Args:
        episodic: restore the initial state before every batch instead of adapting online (continually).
        reset_between_dataloaders: restore the initial state when the test moves to the next dataloader
            (the next corruption type, as in the Tent/RobustBench protocol).
        norm: ``auto`` (BatchNorm if the model has any, else LayerNorm), ``batch``, ``layer`` or ``group``.
        optimizer: ``adam`` (official CIFAR setting) or ``sgd`` (momentum, Nesterov; the ImageNet setting).
        lr: learning rate (official CIFAR-10-C: Adam 1e-3 at batch 200).
        momentum: SGD momentum.
        betas: Adam betas.
        weight_decay: weight decay.
        steps: gradient steps per batch (official default 1).
    """

    # the constructor is NormAffineAdaptation's: Tent only changes the loss

    def loss(self, features: Tensor, logits: Tensor) -> Tensor:
        return softmax_entropy(logits).mean()
