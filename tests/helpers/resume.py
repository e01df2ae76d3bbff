"""Test-only callbacks for the kill-and-resume tests (added on the command line with ``--trainer.callbacks+=``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAtStep(Callback):
    """SIGKILL this process when the fit is about to take optimizer step ``step + 1`` (nothing runs after it).

    Args:
        step: the ``global_step`` at which to die, before that batch starts.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpMetrics(Callback):
    """Write the final logged metrics and the W&B run id (if any) to a JSON file when the fit ends (rank 0).

    Args:
        path: the JSON file to write.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        monitors = [cb for cb in trainer.callbacks if type(cb).__name__ == "EfficiencyMonitor"]  # type: ignore[attr-defined]
        out = {"metrics": metrics, "global_step": trainer.global_step,
               "loggers": {type(lg).__name__: str(lg.version) for lg in trainer.loggers},
               "efficiency": dict(monitors[0].metrics) if monitors else {},
               "train_count": int(getattr(pl_module, "_train_count", -1))}
        Path(self.path).write_text(json.dumps(out))
