"""What Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 costs a training step on a machine with a CUDA build of torch and
no GPU, the cost ``lightning_transfer.cuda_check`` removes.

1. One AdamW step on the quickstart's head (10 x 192 + 10 weights), flag set and cleared in alternating rounds.
2. The quickstart-sized LinearProbe fit (TransferModule, AdamW), flag set and cleared on alternating steps of one
   fit (neighbouring steps paired, as in framework_overhead.py).

    python benchmarks/cuda_check_cost.py
    python benchmarks/cuda_check_cost.py --epochs 12 --rounds 10

Meaningful only where torch is built with CUDA and sees no GPU (it says so and stops otherwise).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import timeit
import warnings

import torch
from framework_overhead import MODELS, synthetic_loader
from lightning.pytorch import Callback, Trainer

from lightning_transfer.backbones.timm import TimmBackbone
from lightning_transfer.cuda_check import NVML_CHECK_VARIABLE
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import LinearProbe


def _flag(on: bool) -> None:
    if on:
        os.environ[NVML_CHECK_VARIABLE] = "1"
    else:
        os.environ.pop(NVML_CHECK_VARIABLE, None)


def optimizer_step_us(rounds: int, steps: int = 500) -> dict[bool, float]:
    """Median microseconds of one AdamW step with the flag set (True) and cleared (False), alternating rounds."""
    params = [torch.nn.Parameter(torch.randn(10, 192)), torch.nn.Parameter(torch.randn(10))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for on in ((True, False) if r % 2 else (False, True)):
            _flag(on)
            times[on].append(timeit.timeit(optimizer.step, number=steps) / steps * 1e6)
    return {on: statistics.median(t) for on, t in times.items()}


class _AlternateFlag(Callback):
    """Sets the flag before even-numbered steps and clears it before odd ones; times each step from one
    ``on_train_batch_start`` to the next, so each flagged step has an unflagged neighbour a few ms away (epoch 0 warms
    up; each epoch's last step, whose interval runs into the epoch-end hooks, is left out)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []  # (flag set, cleared) ms of neighbouring steps
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last, self._flagged = None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch:
            if batch_idx % 2 == 1:  # the step that just ended was even-numbered: flag set
                self._flagged = 1e3 * (now - self._last)
            elif self._flagged is not None:
                self.pairs.append((self._flagged, 1e3 * (now - self._last)))
        _flag(batch_idx % 2 == 0)
        self._last = time.perf_counter()


def fit_step_ms(epochs: int, batch: int = 64, batches: int = 90) -> dict[str, float]:
    """Median ms per training step of the quickstart LinearProbe fit with the flag set and cleared, and the median
    of the per-pair differences."""
    torch.manual_seed(0)
    module = TransferModule(TimmBackbone(**MODELS["quickstart"][0]), LinearProbe(), num_classes=10,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    timer = _AlternateFlag()
    Trainer(max_epochs=epochs + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", callbacks=[timer]).fit(
        module, synthetic_loader(module.backbone, batch, batches))
    flagged, cleared = zip(*timer.pairs)
    return {"set": statistics.median(flagged), "cleared": statistics.median(cleared),
            "saved": statistics.median(a - b for a, b in timer.pairs), "pairs": len(timer.pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="timed epochs of the fit (half the steps with the flag)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of the optimizer step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not torch.backends.cuda.is_built() or torch.cuda.device_count() > 0:
        print("Needs a CUDA build of torch on a machine with no GPU; here the flag costs nothing to remove.")
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    step = optimizer_step_us(args.rounds)
    fit = fit_step_ms(args.epochs)
    print(f"{'what':42s} {'flag set':>10s} {'cleared':>10s} {'saved':>8s} {'ratio':>6s}")
    print(f"{'AdamW step, quickstart head (us)':42s} {step[True]:10.1f} {step[False]:10.1f} "
          f"{step[True] - step[False]:8.1f} {step[False] / step[True]:6.3f}")
    print(f"{'quickstart LinearProbe training step (ms)':42s} {fit['set']:10.2f} {fit['cleared']:10.2f} "
          f"{fit['saved']:8.2f} {fit['cleared'] / fit['set']:6.3f}"
          f"   ({fit['pairs']} step pairs; saved: median of pairs)")


if __name__ == "__main__":
    main()
