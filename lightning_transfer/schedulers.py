"""Learning-rate schedules the published recipes use that torch does not ship as one class, and the per-group
learning-rate scales (layer decay) kept under torch's schedulers that set absolute learning rates."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR


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


def _follows_scales(lrs: list[float], scales: list[float]) -> bool:
    return all(math.isclose(lr * scales[0], lrs[0] * scale, rel_tol=1e-6) for lr, scale in zip(lrs, scales))


def keep_lr_scales(scheduler: Any, optimizer: Optimizer, strategy: str) -> None:
    """Give the groups' ``lr_scale`` back to OneCycleLR and CyclicLR, which set absolute learning rates when built.

    CosineAnnealingLR, StepLR, LambdaLR (WarmupCosineLR) ... scale the learning rates the groups have (already
    multiplied by ``lr_scale``; WarmupCosineLR's warm-up lr is absolute by design and the ratios return after it);
    OneCycleLR and CyclicLR overwrite them with one ``max_lr`` / ``base_lr`` for every group, which would drop layer
    decay and ``backbone_lr_scale``. Their per-group values are rescaled here, once, and checked.
    """
    groups = optimizer.param_groups
    scales = [g.get("lr_scale", 1.0) for g in groups]
    if not isinstance(scheduler, (OneCycleLR, CyclicLR)) or len(set(scales)) < 2 \
            or _follows_scales([g["lr"] for g in groups], scales):
        return
    for group, scale in zip(groups, scales):
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # OneCycleLR keeps its schedule in the groups
            if key in group:
                group[key] = group[key] * scale
    for name in ("base_lrs", "max_lrs", "_last_lr"):  # CyclicLR keeps it on the scheduler
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == len(scales):
            setattr(scheduler, name, [v * scale for v, scale in zip(values, scales)])
    with warnings.catch_warnings():  # get_lr outside step() warns; here it only checks the rescaled schedule
        warnings.simplefilter("ignore")
        lrs = scheduler.get_lr()
    if not _follows_scales([float(lr) for lr in lrs], scales):
        raise ValueError(
            f"{type(scheduler).__name__} sets learning rates that ignore the per-group lr_scale of {strategy} "
            f"({[round(s, 6) for s in scales]}: layer_decay / backbone_lr_scale), and rescaling them failed: use "
            "CosineAnnealingLR or another scheduler that multiplies the optimizer's learning rates, or set "
            "layer_decay=None and backbone_lr_scale=1.0"
        )


# ---- building the optimizer -------------------------------------------------------------------------------------
def check_optimizer_factory(factory: Callable[..., Optimizer]) -> None:
    """Build the optimizer once on a throwaway parameter, so a setting torch rejects (a negative lr, betas outside
    [0, 1)) fails when the model is built, naming the setting, not after the fit has started and a run was logged."""
    import torch
    from torch import nn

    try:
        factory([nn.Parameter(torch.zeros(1))])
    except ValueError as err:
        raise ValueError(f"model.optimizer cannot be built: {err}: fix its init_args (e.g. "
                         "--model.optimizer.init_args.lr=1e-3)") from err
    except Exception:  # noqa: BLE001  a factory that needs more than a parameter list: configure_optimizers will say
        pass


def build_optimization(groups: list[dict[str, Any]], optimizer_factory: Callable[..., Optimizer],
                       scheduler_factory: Callable[..., Any] | None, interval: str, strategy: str) -> Any:
    """What ``configure_optimizers`` returns for the strategy's parameter groups: the optimizer with each group's
    ``lr_scale`` applied (layer-wise decay, backbone lr scale), and the scheduler stepped every ``interval``."""
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError(f"{strategy} leaves no trainable parameters, so there is nothing to fit: run validate/test "
                         "instead, or choose a strategy that trains")
    optimizer = optimizer_factory(groups)
    for group in optimizer.param_groups:  # per-group multipliers (layer-wise decay, backbone lr scale)
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    keep_lr_scales(scheduler, optimizer, strategy)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
