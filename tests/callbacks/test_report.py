"""FitReport: one line per epoch with the epoch's logged metrics and the best so far, and a summary at the end."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_transfer.callbacks.report import FitReport, _batch_size
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import LinearProbe
from tests.helpers.models import tiny_vit


class _Record(Callback):
    """The metrics Lightning holds when fit ends."""

    def on_fit_end(self, trainer, pl_module) -> None:
        self.final = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_line_per_epoch_and_a_summary_with_the_best_and_the_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    record = _Record()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, monitor="val/acc", mode="max")
    trainer = Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[FitReport(), record, checkpoint],
                      default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=4, batch_size=10))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    accs = [float(m) for m in re.findall(r"val/acc (\d+\.\d)%", out)]
    bests = [float(m) for m in re.findall(r"\(best (\d+\.\d)%", out)]
    assert len(accs) == 3 and bests == [max(accs[: i + 1]) for i in range(3)]
    assert abs(accs[-1] - 100 * record.final["val/acc"]) < 0.06  # the last line shows the last epoch's value
    assert f"train loss {record.final['train/loss']:.4f}" in lines[-1] and "img/s" in lines[-1]
    summary = out[out.index("fit done."):]
    assert f"best {max(accs):.1f}%" in summary and f"last {accs[-1]:.1f}%" in summary
    assert str(tmp_path / "checkpoints" / "last.ckpt") in summary and checkpoint.best_model_path in summary
    assert f"run folder: {tmp_path}" in summary


def test_batch_sizes_are_found_in_nested_batches():
    x = torch.zeros(7, 3)
    assert _batch_size((x, torch.zeros(7))) == 7
    assert _batch_size({"source": (x, torch.zeros(7)), "target": torch.zeros(4, 3)}) == 7
    assert _batch_size([torch.tensor(1.0), x]) == 7 and _batch_size("text") == 0


def test_the_cli_adds_the_report_to_fit(tmp_path, capsys):
    from lightning_transfer.cli import TransferCLI

    config = str(Path(__file__).resolve().parents[2] / "configs/quickstart.yaml")
    cli = TransferCLI(args=["fit", "--config", config, "--trainer.logger=false", "--trainer.max_epochs=1",
                            f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_train_batches=1"])
    assert sum(isinstance(cb, FitReport) for cb in cli.trainer.callbacks) == 1
    out = capsys.readouterr().out
    assert "epoch 1/1  train loss" in out and "fit done." in out
