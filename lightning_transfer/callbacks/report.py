"""FitReport: what a ``fit`` from the command line prints, one line per epoch and a summary at the end.

A line per training epoch (printed when the next epoch starts, or at the end, once Lightning has logged the epoch's
metrics): the epoch, its training loss, the validation loss and monitored metric, the best so far and the training
throughput. At the end: the best and last value of the monitored metric, the best and last checkpoint paths, the run
folder, and the W&B run (its page, or the offline folder and the ``wandb sync`` command that uploads it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor


def _batch_size(batch: Any) -> int:
    """Rows of the first tensor in a (nested) batch; 0 when it has none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if metric.endswith(("acc", "acc_top5", "auroc", "aupr", "map")) or "recall" in \
        metric else f"{value:.4f}"


class FitReport(Callback):
    """Print one line per epoch and a summary when fit ends (rank zero only).

    Args:
        monitor: the metric reported as "best"; default: the module's ``monitor`` (the task's validation metric).
    """

    def __init__(self, monitor: str | None = None) -> None:
        self.monitor = monitor
        self.best: tuple[float, int] | None = None
        self.last: float | None = None
        self.pending: int | None = None
        self.started = 0.0
        self.train_seconds = 0.0
        self.images = 0

    def _metric(self, pl_module: LightningModule) -> str:
        return self.monitor or str(getattr(pl_module, "monitor", "val/acc"))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)
        self.started, self.train_seconds, self.images = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.images += _batch_size(batch) * trainer.world_size

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self.started:
            self.train_seconds = time.perf_counter() - self.started  # training only, not validation

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.train_seconds:
            self.train_seconds = time.perf_counter() - self.started
        self.pending = trainer.current_epoch

    def _flush(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending is None:
            return
        epoch, self.pending = self.pending, None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, Tensor) and v.numel() == 1}
        name = self._metric(pl_module)
        value = metrics.get(name)
        if value is not None:
            self.last = value
            if self.best is None or value > self.best[0]:
                self.best = (value, epoch + 1)
        if not trainer.is_global_zero:
            return
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {epoch + 1}{total}", f"train loss {_fmt(metrics.get('train/loss'), 'loss')}"]
        if "val/loss" in metrics:
            parts.append(f"val loss {_fmt(metrics['val/loss'], 'loss')}")
        if value is not None and self.best is not None:
            parts.append(f"{name} {_fmt(value, name)} (best {_fmt(self.best[0], name)}, epoch {self.best[1]})")
        if self.train_seconds > 0 and self.images:
            parts.append(f"{self.images / self.train_seconds:,.0f} img/s")
        print("  ".join(parts), flush=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        name = self._metric(pl_module)
        lines = ["fit done."]
        if self.best is not None:
            best, last = _fmt(self.best[0], name), _fmt(self.last, name)
            lines.append(f"  {name}: best {best} (epoch {self.best[1]}), last {last}")
        checkpoint = trainer.checkpoint_callback
        for label, attr in (("best checkpoint", "best_model_path"), ("last checkpoint", "last_model_path")):
            path = getattr(checkpoint, attr, "") if checkpoint is not None else ""
            if path:
                lines.append(f"  {label}: {path}")
        folder = run_folder(trainer)
        if folder:
            lines.append(f"  run folder: {folder}")
        lines.extend(f"  {line}" for line in wandb_lines(trainer))
        print("\n".join(lines), flush=True)


def run_folder(trainer: Trainer) -> str | None:
    """The folder the run writes into: its checkpoints' parent, else the logger's folder."""
    checkpoint = trainer.checkpoint_callback
    dirpath = getattr(checkpoint, "dirpath", None)
    if dirpath:
        path = Path(dirpath)
        return str(path.parent if path.name == "checkpoints" else path)
    return trainer.log_dir


def wandb_lines(trainer: Trainer) -> list[str]:
    """Where the W&B run is: its page, or its offline folder and how to upload it."""
    lines = []
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        url = None if getattr(run, "offline", False) else getattr(run, "url", None)
        if url:
            lines.append(f"W&B run: {url}")
            continue
        run_dir = getattr(run, "dir", None)
        if run_dir:
            offline = Path(run_dir).parent  # the run's folder (its files/ holds the config and outputs)
            lines.append(f"W&B offline run: {offline} (upload it with: wandb sync {offline})")
    return lines
