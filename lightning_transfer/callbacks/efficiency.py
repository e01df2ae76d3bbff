"""Efficiency measurements every fit reports: parameters, checkpoint size, throughput and training memory."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn


class SavedTensorsCounter:
    """Count the bytes autograd saves for backward, each storage once, parameters excluded.

    Use as a context manager around a forward pass. Parameters (trainable or frozen) are already resident, so
    their storages are not counted: the number is the activation memory a training step adds.
    """

    def __init__(self, exclude: nn.Module | None = None) -> None:
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude else set()
        self._seen: set[tuple[Any, int]] = set()
        self.bytes = 0
        self.tensors = 0
        self._hooks: Any = None

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        key = (tensor.device, ptr)
        if ptr not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
            self.tensors += 1
        return tensor

    def __enter__(self) -> SavedTensorsCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def saved_bytes(fn: Callable[[], Any], exclude: nn.Module | None = None) -> int:
    """Bytes saved for backward while running ``fn`` (see :class:`SavedTensorsCounter`)."""
    with SavedTensorsCounter(exclude) as counter:
        fn()
    return counter.bytes


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class EfficiencyMonitor(Callback):
    """Log trainable/total parameters and checkpoint size once per fit; throughput and memory every epoch.

    Throughput leaves out the fit's first training step (one-off costs, and the saved-bytes count runs in it), unless
    an epoch has no other step; under DDP it is the run's (every process's samples over the slowest process's time),
    not one process's share. Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` in the epoch; on
    every device the bytes saved for backward in the first training step of the fit (:class:`SavedTensorsCounter`)
    and the process's peak RSS.

    Args:
        measure_saved_bytes: count the saved-for-backward bytes of the first training step.
    """

    def __init__(self, measure_saved_bytes: bool = True) -> None:
        self.measure_saved_bytes = measure_saved_bytes
        self._counter: SavedTensorsCounter | None = None
        self._measured = False
        self._samples = 0
        self._train_time = 0.0
        self._batch_start = 0.0
        self._warmed_up = False
        self._first: tuple[int, float] | None = None
        self.metrics: dict[str, float] = {}

    def _log(self, trainer: Trainer, metrics: dict[str, float], epoch_end: bool = False) -> None:
        self.metrics.update(metrics)
        if trainer.is_global_zero:
            # an epoch's numbers at its last step, with the epoch, as Lightning logs the epoch's own metrics
            step = max(trainer.global_step - 1, 0) if epoch_end else trainer.global_step
            extra = {"epoch": float(trainer.current_epoch)} if epoch_end else {}
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, **extra}, step=step)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        self._log(trainer, {
            "params/trainable": float(trainable), "params/total": float(total),
            "params/trainable_pct": 100.0 * trainable / max(total, 1),
        })

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samples, self._train_time = 0, 0.0
        self._first = None
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.measure_saved_bytes and not self._measured:
            self._counter = SavedTensorsCounter(exclude=pl_module).__enter__()
        self._batch_start = time.perf_counter()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._counter is not None:  # forward done: everything backward needs has been saved
            self._counter.__exit__(None, None, None)
            self._log(trainer, {"memory/saved_for_backward_mb": self._counter.bytes / 2**20})
            self._counter, self._measured = None, True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is not None:  # a step without backward (e.g. skipped)
            self._counter.__exit__(None, None, None)
            self._counter = None
        elapsed = time.perf_counter() - self._batch_start
        samples = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
        if not self._warmed_up:  # the fit's first step: one-off costs (allocator, lazy init) and the byte counter
            self._warmed_up, self._first = True, (samples, elapsed)
            return
        self._train_time += elapsed
        self._samples += samples

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._samples == 0 and self._first is not None:  # the epoch had only the first step: it is all there is
            self._samples, self._train_time = self._first
        samples, seconds = float(self._samples), self._train_time
        # under DDP the run's throughput: every process's samples over the slowest process's time
        if getattr(trainer, "world_size", 1) > 1:
            samples = float(trainer.strategy.reduce(torch.tensor(samples, device=pl_module.device), reduce_op="sum"))
            seconds = float(trainer.strategy.reduce(torch.tensor(seconds, device=pl_module.device), reduce_op="max"))
        metrics = {"perf/train_samples_per_s": samples / max(seconds, 1e-9),
                   "memory/peak_rss_mb": peak_rss_bytes() / 2**20}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["memory/cuda_peak_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        self._log(trainer, metrics, epoch_end=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        callback = trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path and Path(path).is_file():
            self._log(trainer, {"checkpoint/size_mb": os.path.getsize(path) / 2**20})
