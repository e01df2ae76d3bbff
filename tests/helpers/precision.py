"""One optimizer step of a contract case under mixed precision, gradient accumulation and clipping.

Shared by ``tests/strategies/test_precision.py`` (CPU, bf16) and ``scripts/gpu_check.py`` (CUDA, bf16 and fp16, with
peak memory).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tests.strategies.test_contract import _build, _digits


class _Record(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning hands over the loss divided by accumulate_grad_batches (what it back-propagates)
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        grads = [p.grad.float().norm() for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(grads).norm()) if grads else math.nan)


def one_step(name: str, case: dict, kind: str, accelerator: str = "cpu", precision: str = "bf16-mixed",
             accumulate: int = 2, clip: float = 1.0) -> dict[str, Any]:
    """Fit ``accumulate`` batches = one optimizer step with gradient clipping (validate for strategies that train
    nothing). Returns the batch losses, the gradient norm before clipping, whether every trainable parameter group
    changed while frozen ones did not, and the peak CUDA memory (MiB) on a GPU.

    In ``16-mixed`` the loss scaler starts at 2**16 and skips the steps whose scaled gradients overflow fp16, halving
    its scale each time (seen on the H100 for CoOp: the first step's gradients through CLIP's text tower overflow).
    So fp16 runs 8 steps; ``skipped_steps`` counts the skipped ones and ``grad_norm`` is the last finite one.
    """
    module = _build(name, case, kind)
    recorder = _Record()
    max_steps = 8 if precision == "16-mixed" else 1
    trainer = Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=max_steps,  # type: ignore[arg-type]
                      accumulate_grad_batches=accumulate, gradient_clip_val=clip, limit_val_batches=1,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[recorder])
    cuda = accelerator in ("cuda", "gpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    if module.adaptation.trains_nothing:
        trainer.validate(module, datamodule=_digits(module), verbose=False)
        losses = [float(trainer.callback_metrics["val/loss"])]
    else:
        trainer.fit(module, datamodule=_digits(module))
        losses = recorder.losses
    after = dict(module.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    changed = {n for n, p in after.items() if not torch.equal(p.detach().cpu(), before[n].cpu())}
    finite = [g for g in recorder.grad_norms if math.isfinite(g)]
    return {
        "losses": losses,
        "grad_norm": finite[-1] if finite else math.nan,
        "skipped_steps": len(recorder.grad_norms) - len(finite),
        "steps": trainer.global_step,
        "trainable_changed": bool(changed & trainable),
        "frozen_changed": sorted(changed - trainable),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan,
    }
