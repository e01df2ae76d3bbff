"""A progress bar that redraws by time, not every batch: the CLI's default."""

from __future__ import annotations

import math
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

_Shown = int | str | float | dict[str, float]  # what Lightning's bars accept as a postfix value


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, redrawn at most once every ``refresh_seconds`` (and at each loop's last batch).

    Lightning's bar redraws and rebuilds its metrics postfix every ``refresh_rate`` batches, by default every batch:
    0.87 ms a step on a 2-core CPU (a bare LightningModule), 4% of a 20 ms step. A step count cannot suit both a fast
    loop and a slow one (refresh every 10 batches is still 5 redraws a second at 20 ms a step, and one every 10 s at
    1 s a step), so this bar also waits for the clock. ``python -m lightning_transfer fit`` adds it when it builds the
    Trainer, unless the config names a progress bar of its own or sets ``trainer.enable_progress_bar: false`` or
    ``trainer.barebones: true``. Its postfix also shows ``train/loss``, the running mean of the epoch's training loss,
    read from the module only when the bar redraws.

    Args:
        refresh_seconds: least time between two redraws; 0 redraws on every ``refresh_rate``-th batch like Lightning.
        refresh_rate, process_position, leave: as for :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    def __init__(self, refresh_seconds: float = 0.5, refresh_rate: int = 1, process_position: int = 0,
                 leave: bool = False) -> None:
        if not refresh_seconds >= 0:
            raise ValueError(f"refresh_seconds={refresh_seconds!r}: give the least time between redraws, >= 0")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.refresh_seconds = refresh_seconds
        self._last_redraw = -math.inf
        self._train_batches = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._train_batches = batch_idx + 1
        if self._due(self.train_progress_bar, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # an epoch cut short (max_steps) or of unknown length may have skipped its last redraws: show the true count
        # (Lightning's epoch-end postfix update below redraws the bar)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = self._train_batches
        super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, _Shown]:
        """Lightning's postfix, plus the epoch's running training loss of a module that keeps one (TransferModule)."""
        metrics = super().get_metrics(trainer, pl_module)
        running = getattr(pl_module, "running_train_loss", None)
        loss = running() if callable(running) else None
        if loss is not None:
            metrics["train/loss"] = loss
        return metrics

    def _due(self, bar: Any, batch_idx: int) -> bool:
        """Redraw now: at a loop's last batch, or once ``refresh_seconds`` have passed since the last redraw."""
        if bar is None or bar.disable:
            return False
        now = time.monotonic()
        if batch_idx + 1 == bar.total or now - self._last_redraw >= self.refresh_seconds:
            self._last_redraw = now
            return True
        return False

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(self.val_progress_bar, batch_idx):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(self.test_progress_bar, batch_idx):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(self.predict_progress_bar, batch_idx):
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
