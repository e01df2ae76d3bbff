"""ThrottledProgressBar redraws by the clock, and the CLI gives it to every run that shows a progress bar."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_transfer.callbacks import ThrottledProgressBar
from lightning_transfer.cli import TransferCLI
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import LinearProbe
from tests.conftest import REPO
from tests.helpers.models import tiny_vit

QUICK = str(REPO / "configs" / "quickstart.yaml")
NO_LOGGER = ["--trainer.logger=false"]


def _postfix_calls(monkeypatch, bar, max_steps: int = -1) -> list[int]:
    """Fit 10 training batches with ``bar`` and list the batch count the bar showed at each redraw of its postfix."""
    calls: list[int] = []
    original = Tqdm.set_postfix
    monkeypatch.setattr(Tqdm, "set_postfix", lambda self, *a, **k: (calls.append(self.n), original(self, *a, **k)))
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    trainer = Trainer(max_epochs=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, callbacks=[bar], accelerator="cpu")
    trainer.fit(module, datamodule=Digits(task="target", num_shots=10, batch_size=5))  # 50 images: 10 batches
    return calls


def test_redraws_wait_for_the_clock_but_the_last_batch_is_always_drawn(monkeypatch):
    assert len(_postfix_calls(monkeypatch, TQDMProgressBar())) == 11  # Lightning's: every batch, then epoch end
    calls = _postfix_calls(monkeypatch, ThrottledProgressBar(refresh_seconds=3600))
    assert calls == [1, 10, 10]  # the first batch, the last batch, the epoch end


def test_an_epoch_cut_short_still_ends_on_its_true_count(monkeypatch):
    assert _postfix_calls(monkeypatch, ThrottledProgressBar(refresh_seconds=3600), max_steps=7) == [1, 7]


def test_zero_seconds_draws_like_lightnings_bar(monkeypatch):
    assert len(_postfix_calls(monkeypatch, ThrottledProgressBar(refresh_seconds=0, refresh_rate=2))) == 6


def test_a_negative_interval_is_refused():
    with pytest.raises(ValueError, match="refresh_seconds=-1"):
        ThrottledProgressBar(refresh_seconds=-1)


def _bars(args: list[str]) -> list:
    cli = TransferCLI(args=["--config", QUICK, *NO_LOGGER, *args], run=False)
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, (TQDMProgressBar, RichProgressBar))]


def test_cli_gives_runs_with_a_progress_bar_the_throttled_one():
    bars = _bars(["--trainer.enable_progress_bar=true"])
    assert len(bars) == 1 and type(bars[0]) is ThrottledProgressBar and bars[0].refresh_seconds == 0.5


def test_the_bar_is_not_written_into_the_saved_config_and_barebones_runs_without_it(tmp_path):
    cli = TransferCLI(args=["--config", QUICK, *NO_LOGGER, "--trainer.enable_progress_bar=true"], run=False)
    assert "ThrottledProgressBar" not in str(cli.config.trainer.callbacks)  # what config.yaml would hold
    # barebones turns the progress bar off itself; a bar in the callbacks would make the Trainer refuse to start
    bare = TransferCLI(args=["--config", QUICK, *NO_LOGGER, "--trainer.barebones=true",
                             "--trainer.enable_progress_bar=null", "--trainer.enable_checkpointing=false",
                             "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=null",
                             "--trainer.num_sanity_val_steps=null", "--trainer.callbacks=null"], run=False)
    assert not any(isinstance(cb, (TQDMProgressBar, RichProgressBar)) for cb in bare.trainer.callbacks)


def test_cli_keeps_a_configured_progress_bar_and_a_disabled_one():
    assert _bars([]) == []  # configs/quickstart.yaml turns progress bars off
    bars = _bars(["--trainer.enable_progress_bar=true", "--trainer.callbacks+=TQDMProgressBar",
                  "--trainer.callbacks.refresh_rate=7"])
    assert len(bars) == 1 and type(bars[0]) is TQDMProgressBar and bars[0].refresh_rate == 7


def test_the_bar_shows_the_running_training_loss_without_a_per_step_progress_bar_metric():
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    assert module.running_train_loss() is None  # nothing trained yet
    bar = ThrottledProgressBar()
    trainer = Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, callbacks=[bar], accelerator="cpu", log_every_n_steps=1)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=4, batch_size=5))
    # a progress-bar metric logged on steps would be read back with .item() on every step (a GPU sync)
    assert "train/loss_step" in trainer.logged_metrics and "train/loss_step" not in trainer.progress_bar_metrics
    shown = bar.get_metrics(trainer, module)["train/loss"]
    assert shown == pytest.approx(float(trainer.logged_metrics["train/loss"]))  # the epoch's mean
