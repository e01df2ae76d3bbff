"""TransferModule swaps Lightning's default do-nothing profiler for a cheaper one, and keeps a profiler you chose."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.profilers import PassThroughProfiler, SimpleProfiler

from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.profiling import NullProfiler
from lightning_transfer.strategies import LinearProbe
from tests.helpers.models import tiny_vit


def _fit(**kw) -> Trainer:
    trainer = Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kw)
    trainer.fit(TransferModule(tiny_vit(), LinearProbe(), num_classes=5),
                datamodule=Digits(task="target", num_shots=2, batch_size=5))
    return trainer


def test_the_default_profiler_becomes_the_null_one():
    trainer = _fit()
    assert type(trainer.profiler) is NullProfiler and isinstance(trainer.profiler, PassThroughProfiler)
    assert trainer.global_step == 2


def test_a_chosen_profiler_is_kept_and_still_records_the_hooks(tmp_path):
    trainer = _fit(profiler=SimpleProfiler(dirpath=tmp_path, filename="profile"))
    assert type(trainer.profiler) is SimpleProfiler
    assert any("training_step" in action for action in trainer.profiler.recorded_durations)


def test_the_null_profiler_context_nests_and_profiles_nothing():
    profiler = NullProfiler()
    with profiler.profile("outer"), profiler.profile("inner"), profiler.profile("outer"):
        pass
    assert profiler.summary() == ""
