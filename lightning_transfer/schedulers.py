"""Learning-rate schedules the published recipes use that torch does not ship as one class."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(epoch: int, max_epochs: int, warmup_epochs: int, warmup_factor: float) -> float:
    """Multiplier of the base lr at ``epoch``: ``warmup_factor`` while warming up, then cosine from 1 towards 0.

    After the warm-up the cosine restarts at its own epoch 0 and spans ``max_epochs`` (Dassl's constant warm-up
    wraps a ``CosineAnnealingLR(T_max=max_epoch)`` that only starts stepping once the warm-up is over).
    """
    if epoch < warmup_epochs:
        return warmup_factor
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max_epochs))


class WarmupCosineLR(LambdaLR):
    """Constant warm-up lr for ``warmup_epochs``, then cosine annealing: CoOp's schedule (arXiv:2109.01134).

    CoOp trains with ``warmup_lr=1e-5`` for one epoch before the cosine schedule over ``max_epochs``; step it
    once per epoch (the module's default ``lr_scheduler_interval``).

    Args:
        optimizer: the wrapped optimizer.
        max_epochs: length of the cosine part, in epochs (CoOp: the run's max epochs).
        warmup_epochs: epochs at the constant ``warmup_lr``.
        warmup_lr: the warm-up learning rate (absolute, the same for every parameter group).
    """

    def __init__(self, optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5,
                 last_epoch: int = -1) -> None:
        if max_epochs < 1 or warmup_epochs < 0 or warmup_lr < 0:
            raise ValueError(f"WarmupCosineLR needs max_epochs >= 1, warmup_epochs >= 0 and warmup_lr >= 0; got "
                             f"{max_epochs}, {warmup_epochs}, {warmup_lr}")
        factors: list[Callable[[int], float]] = []
        for group in optimizer.param_groups:
            base = group.get("initial_lr", group["lr"])
            factors.append(partial(warmup_cosine_factor, max_epochs=max_epochs, warmup_epochs=warmup_epochs,
                                   warmup_factor=warmup_lr / base if base > 0 else 0.0))
        super().__init__(optimizer, factors, last_epoch=last_epoch)
