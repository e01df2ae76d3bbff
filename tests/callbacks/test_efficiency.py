"""The efficiency numbers every comparison relies on, checked against hand computations."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_transfer.callbacks.efficiency import EfficiencyMonitor, peak_rss_bytes, saved_bytes
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import FullFinetune, LinearProbe
from tests.helpers.models import tiny_vit

F32 = 4


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_saved_bytes_matches_hand_count_all_trainable():
    m, x = _mlp(), torch.randn(5, 4)
    # Linear1 saves its input x (5x4) for the weight gradient; ReLU saves its output (5x8), which Linear2 also saves
    # as its input - one storage, counted once. Weights are parameters, excluded.
    assert saved_bytes(lambda: m(x).sum(), exclude=m) == (5 * 4 + 5 * 8) * F32


def test_saved_bytes_frozen_first_layer_saves_nothing_there():
    m, x = _mlp(), torch.randn(5, 4)
    m[0].requires_grad_(False)  # x needs no gradient and W1 is frozen: nothing to save for Linear1
    assert saved_bytes(lambda: m(x).sum(), exclude=m) == 5 * 8 * F32


def test_saved_bytes_counts_parameters_when_not_excluded():
    m, x = _mlp(), torch.randn(5, 4)
    with_params = saved_bytes(lambda: m(x).sum())
    assert with_params == (5 * 4 + 5 * 8 + 8 * 3) * F32  # Linear2's weight is saved to compute grad of its input


def test_no_grad_saves_nothing():
    m, x = _mlp(), torch.randn(5, 4)
    with torch.no_grad():
        assert saved_bytes(lambda: m(x).sum(), exclude=m) == 0


def test_peak_rss_grows_with_a_big_allocation():
    before = peak_rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert block.sum() > 0
    assert peak_rss_bytes() >= before and peak_rss_bytes() > 64 * 2**20


def _fit_with_monitor(strategy) -> tuple[TransferModule, dict[str, float]]:
    module = TransferModule(tiny_vit(), strategy, num_classes=5)
    dm = Digits(task="target", num_shots=4, batch_size=10)
    monitor = EfficiencyMonitor()
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return module, monitor.metrics


def test_monitor_logs_params_memory_and_throughput():
    full_module, full = _fit_with_monitor(FullFinetune())
    probe_module, probe = _fit_with_monitor(LinearProbe())
    for module, m in ((full_module, full), (probe_module, probe)):
        counts = module.parameter_counts()
        assert m["params/trainable"] == counts["trainable"] and m["params/total"] == counts["total"]
        assert m["perf/train_samples_per_s"] > 0 and m["memory/peak_rss_mb"] > 0
    # the probe's frozen trunk runs under no_grad: it saves the final token storage (the pooled CLS is a view of
    # it) and the loss's tensors, against every block's activations for full fine-tuning
    tokens_bytes = 10 * 17 * probe_module.backbone.num_features * F32
    assert tokens_bytes <= probe["memory/saved_for_backward_mb"] * 2**20 < tokens_bytes + 1024
    assert full["memory/saved_for_backward_mb"] > 10 * probe["memory/saved_for_backward_mb"]


def test_throughput_leaves_out_the_fit_s_first_step_and_logs_at_the_epoch_s_last_step(monkeypatch):
    from types import SimpleNamespace

    import lightning_transfer.callbacks.efficiency as efficiency

    ticks = iter([0.0, 1.0, 1.0, 1.1, 1.1, 1.2, 5.0, 5.5])  # (start, end) per step: the first 1 s, then 0.1 s each
    monkeypatch.setattr(efficiency, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], global_step=3, current_epoch=0)
    module = SimpleNamespace(device=torch.device("cpu"))
    monitor = EfficiencyMonitor(measure_saved_bytes=False)

    def epoch(steps):
        monitor.on_train_epoch_start(trainer, module)
        for i in range(steps):
            batch = (torch.zeros(10, 1), torch.zeros(10))
            monitor.on_train_batch_start(trainer, module, batch, i)
            monitor.on_train_batch_end(trainer, module, None, batch, i)
        monitor.on_train_epoch_end(trainer, module)
        return monitor.metrics["perf/train_samples_per_s"]

    assert epoch(3) == pytest.approx(20 / 0.2)  # 1 s of warm-up would have given 30 / 1.2 = 25
    step, metrics = logged[-1]
    assert step == 2 and metrics["epoch"] == 0  # global_step 3 after the epoch's 3 steps: its last is step 2
    assert epoch(1) == pytest.approx(10 / 0.5)  # a later epoch's one step counts: it is not the fit's first
