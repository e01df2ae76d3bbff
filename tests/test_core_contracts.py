"""The core's contracts for the families to come, each proven by a small part from tests/helpers/contract_parts.py:
two-stream training (PairedDomains), a strategy-owned loss with logged terms, trainable and frozen auxiliary
networks, closed-form heads, and the anomaly-detection and retrieval tasks. Each runs through fit, test and a strict
checkpoint round trip here; tests/test_distributed.py runs them under 2-process DDP."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transfer.checkpointing import CHECKPOINT_KEY, CheckpointMismatch
from lightning_transfer.datamodules import Digits
from lightning_transfer.datamodules.paired import PairedDomains
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import LinearProbe
from tests.helpers.contract_parts import (
    DistanceToMean,
    NearestMeanHead,
    OneClassDigits,
    ProjectedEmbedding,
    RetrievalDigits,
    TeacherHint,
    TwoStreamProbe,
)
from tests.helpers.models import TINY_VIT, tiny_vit


def _trainer(**kw) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return Trainer(**{**defaults, **kw})


def paired(batch_size: int = 5) -> PairedDomains:
    source = Digits(task="target", num_shots=6, batch_size=batch_size, seed=1)
    target = Digits(task="target", num_shots=3, batch_size=batch_size, seed=2)  # another draw of the same classes
    return PairedDomains(source, target, validate_on="target")


def _round_trip(module: TransferModule, trainer: Trainer, tmp_path) -> TransferModule:
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    loaded = TransferModule.load_from_checkpoint(path, weights_only=True)  # strict=True
    for key, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    return loaded


# ---- two streams --------------------------------------------------------------------------------------------
def test_a_two_stream_strategy_gets_source_and_target_batches_and_logs_its_terms(tmp_path):
    module = TransferModule(tiny_vit(), TwoStreamProbe(), num_classes=5)
    seen = []
    original = module.adaptation.training_loss
    module.adaptation.training_loss = lambda b, h, batch: seen.append(batch) or original(b, h, batch)
    trainer = _trainer(max_epochs=2)
    trainer.fit(module, datamodule=paired())
    first = seen[0]
    assert set(first) == {"source", "target"}
    xs, ys = first["source"]
    assert xs.shape == (5, 1, 8, 8) and ys.shape == (5,) and torch.is_tensor(first["target"])
    assert first["target"].shape[1:] == (1, 8, 8)  # inputs only: no target labels reach the strategy
    assert len(seen) == 2 * 6  # 30 source images (the longer stream) in batches of 5, 2 epochs; the target cycles
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "train/entropy", "train/domain", "val/acc"} <= set(metrics)
    result = trainer.test(module, datamodule=paired(), verbose=False)[0]
    assert 0 <= result["test/acc"] <= 1
    del module.adaptation.training_loss
    _round_trip(module, trainer, tmp_path)


def test_the_discriminator_is_saved_and_has_its_own_parameter_group(tmp_path):
    module = TransferModule(tiny_vit(), TwoStreamProbe(), num_classes=5)
    groups = module.configure_optimizers().param_groups
    named = [g for g in groups if g.get("name") == "discriminator"]
    disc = {id(p) for p in module.adaptation.discriminator.parameters()}
    assert named and {id(p) for g in named for p in g["params"]} == disc
    assert not any(id(p) in disc for g in groups if g.get("name") != "discriminator" for p in g["params"])
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=paired())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("adaptation.discriminator.") for k in saved)


def test_paired_domains_refuse_different_class_sets():
    source, target = Digits(task="source"), Digits(task="target")  # digits 0-4 and 5-9
    data = PairedDomains(source, target)
    data.set_data_config(tiny_vit().data_config())
    with pytest.raises(ValueError, match="different classes.*one label space"):
        data.setup("fit")


# ---- frozen auxiliary networks -----------------------------------------------------------------------------
def test_a_frozen_teacher_is_left_out_of_the_checkpoint_and_checked_on_reload(tmp_path):
    module = TransferModule(tiny_vit(), TeacherHint(teacher_backbone=tiny_vit()), num_classes=5)
    assert not any(p.requires_grad for p in module.adaptation.teacher.parameters())
    trainer = _trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=3, batch_size=5))
    assert "train/hint" in trainer.callback_metrics
    assert not module.adaptation.teacher.training  # eval mode always
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("adaptation.teacher.") for k in saved["state_dict"])
    assert saved[CHECKPOINT_KEY]["frozen_networks"]["adaptation.teacher"]["keys"] > 0
    _round_trip(module, trainer, tmp_path)
    # a teacher built from other weights is not the one the run used: refused, naming it
    other = {**TINY_VIT, "checkpoint_path": None}
    hparams = saved["hyper_parameters"]
    hparams["adaptation"]["init_args"]["teacher_backbone"]["init_args"].update(other)
    torch.save(saved, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatch, match="frozen network adaptation.teacher .*weights differ"):
        TransferModule.load_from_checkpoint(tmp_path / "other.ckpt", weights_only=True)


def test_a_teacher_from_a_fit_checkpoint_gives_the_teachers_logits(tmp_path):
    teacher = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(teacher, datamodule=Digits(task="target", num_shots=2, batch_size=5))
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    student = TransferModule(tiny_vit(), TeacherHint(teacher_checkpoint=str(tmp_path / "teacher.ckpt")), num_classes=5)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(student.adaptation.teacher(x), teacher.eval()(x))
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint .*does not exist"):
        TeacherHint(teacher_checkpoint=str(tmp_path / "missing.ckpt"))


# ---- closed-form heads --------------------------------------------------------------------------------------
def test_a_closed_form_head_is_fitted_once_from_the_training_features(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5, head=NearestMeanHead(),
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # lr 0: only the closed form counts
    data = Digits(task="target", num_shots=4, batch_size=5)
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert bool(module.head.fitted)
    x, y = data.datasets["train"].tensors
    with torch.no_grad():
        features = module.backbone.eval()(x)
    expected = torch.stack([features[y == c].mean(0) for c in range(5)])
    torch.testing.assert_close(module.head.means.detach(), expected, atol=1e-5, rtol=1e-5)
    loaded = _round_trip(module, trainer, tmp_path)
    assert bool(loaded.head.fitted)  # a resumed fit does not fit it again


# ---- tasks --------------------------------------------------------------------------------------------------
def test_anomaly_detection_metrics_and_monitor_follow_the_datamodules_task(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=1, head=DistanceToMean(),
                            task="anomaly_detection")
    assert module.monitor == "val/auroc" and not module.automatic_optimization  # nothing trains but the head
    trainer = _trainer(max_epochs=1)
    data = OneClassDigits(normal=0, batch_size=32)
    trainer.fit(module, datamodule=data)
    assert bool(module.head.fitted)
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    assert set(result) == {"test/auroc", "test/aupr", "test/fpr95"}
    assert result["test/auroc"] > 0.6  # distance to the normal digit's mean separates it from the others
    _round_trip(module, trainer, tmp_path)


def test_retrieval_metrics_follow_the_datamodules_task(tmp_path):
    module = TransferModule(tiny_vit(), ProjectedEmbedding(num_classes=5), num_classes=5, task="retrieval")
    assert module.head is None and module.monitor == "val/map"
    trainer = _trainer(max_epochs=2)
    data = RetrievalDigits(batch_size=64)
    trainer.fit(module, datamodule=data)
    assert {"val/recall@1", "val/recall@5", "val/map", "train/loss"} <= set(trainer.callback_metrics)
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    assert result["test/recall@5"] >= result["test/recall@1"] > 0.2
    _round_trip(module, trainer, tmp_path)


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'segmentation'.*classification, anomaly_detection, retrieval"):
        TransferModule(tiny_vit(), num_classes=5, task="segmentation")


# ---- the command line refuses a pairing that cannot train ---------------------------------------------------
_PAIRED_YAML = """
data:
  class_path: lightning_transfer.datamodules.paired.PairedDomains
  init_args:
    source: {class_path: lightning_transfer.datamodules.Digits, init_args: {task: target, num_shots: 4, seed: 1}}
    target: {class_path: lightning_transfer.datamodules.Digits, init_args: {task: target, num_shots: 4, seed: 2}}
"""


@pytest.mark.parametrize(("adaptation", "paired_data", "message"), [
    ("tests.helpers.contract_parts.TwoStreamProbe", False, "pair a source and a target datamodule with "
                                                          "data=PairedDomains"),
    ("LinearProbe", True, "yields two streams .* but LinearProbe trains on one: choose a domain-adaptation strategy"),
])
def test_fit_refuses_a_strategy_and_datamodule_of_different_streams(tmp_path, adaptation, paired_data, message):
    from lightning_transfer.__main__ import main
    from tests.conftest import REPO

    data = tmp_path / "paired.yaml"
    data.write_text(_PAIRED_YAML)
    configs = ["--config", str(REPO / "configs/quickstart.yaml")]
    if paired_data:
        configs += ["--config", str(data)]
    with pytest.raises(ValueError, match=message):
        main(["fit", *configs, f"--model.adaptation={adaptation}", "--trainer.logger=false",
              "--trainer.max_steps=1"])


def test_a_two_stream_fit_runs_from_the_command_line(tmp_path):
    from lightning_transfer.__main__ import main
    from tests.conftest import REPO

    data = tmp_path / "paired.yaml"
    data.write_text(_PAIRED_YAML)
    main(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--config", str(data),
          "--model.adaptation=tests.helpers.contract_parts.TwoStreamProbe", "--trainer.logger=false",
          "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
