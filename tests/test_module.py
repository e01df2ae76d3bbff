"""TransferModule: metrics, optimizer groups, small strict checkpoints and their errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import Tensor

from lightning_transfer.backbones.cifar_resnet import CIFARResNet
from lightning_transfer.backbones.timm import TimmBackbone
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import CheckpointMismatch, TransferModule
from lightning_transfer.strategies import FullFinetune, LinearProbe, PartialFreeze
from lightning_transfer.strategies.bitfit import BitFit
from lightning_transfer.strategies.full import layer_lr_scales
from lightning_transfer.strategies.lora import LoRA
from lightning_transfer.strategies.norm_tuning import NormTuning
from lightning_transfer.strategies.vqt import VQT
from tests.helpers.models import TINY_VIT, inputs_for, tiny_cnn, tiny_vit
from tests.helpers.tiny_clip import tiny_clip, tiny_clip_resnet


def _trainer(**kw) -> Trainer:
    return Trainer(**{"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                      "enable_model_summary": False, "accelerator": "cpu", **kw})


def _fit_and_save(module: TransferModule, path, num_shots: int = 2) -> None:
    dm = Digits(task="target", num_shots=num_shots, batch_size=5)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)


def test_metrics_per_stage_include_top5_and_ece():
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    trainer = _trainer(max_epochs=1)
    dm = Digits(task="target", num_shots=3, batch_size=8)
    trainer.fit(module, datamodule=dm)
    assert {"val/acc", "val/ece", "train/acc", "train/loss"} <= set(trainer.logged_metrics)
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert {"test/acc", "test/acc_top5", "test/ece", "test/loss"} <= set(metrics)
    assert metrics["test/acc_top5"] == pytest.approx(1.0)  # 5 classes: the true class is always in the top 5
    assert 0.0 <= metrics["test/ece"] <= 1.0
    few = TransferModule(tiny_vit(), LinearProbe(), num_classes=3)
    assert "acc_top5" not in few.val_metrics  # top-5 only where there are at least 5 classes


def test_training_loss_and_accuracy_are_the_epoch_means():
    # lr=0: the model never changes, so the epoch's training numbers equal one pass over the training set
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5,
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    dm = Digits(task="target", num_shots=5, batch_size=4)  # 25 images: batches of 4, 4, ..., 1
    trainer = _trainer(max_epochs=1, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    module.train()
    with torch.no_grad():
        batches = [(module(x), y) for x, y in dm.train_dataloader()]
    logits, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    expected_loss = torch.nn.functional.cross_entropy(logits, labels)
    assert float(trainer.logged_metrics["train/loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    assert float(trainer.logged_metrics["train/acc"]) == pytest.approx(float(accuracy))
    assert "train/loss_step" in trainer.logged_metrics


def _loader(seed: int, n: int, batch_size: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _expected(module: TransferModule, loader) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(x) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    return {"loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "acc": float((logits.argmax(-1) == labels).float().mean())}


def test_evaluation_numbers_are_over_every_sample_of_each_dataloader_and_start_afresh_each_run():
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    trainer = _trainer()
    # batches of 5, 5, 3: a mean of the batch means would weigh the last three samples more
    first, second, third = _loader(0, 13, 5), _loader(1, 9, 4), _loader(2, 7, 3)
    val = trainer.validate(module, first, verbose=False)[0]
    expected = _expected(module, first)
    assert val["val/loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert val["val/acc"] == pytest.approx(expected["acc"])
    assert "val/loss" in trainer.progress_bar_metrics
    # a second run counts only its own samples (the metrics were reset), and each test dataloader only its own
    results = trainer.test(module, [second, third], verbose=False)
    for index, loader in enumerate((second, third)):
        expected = _expected(module, loader)
        assert results[index][f"test/loss/dataloader_idx_{index}"] == pytest.approx(expected["loss"], rel=1e-5)
        assert results[index][f"test/acc/dataloader_idx_{index}"] == pytest.approx(expected["acc"])


def test_an_evaluation_that_failed_part_way_leaves_nothing_in_the_next_ones_numbers():
    class Fail(Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                raise RuntimeError("stop")

        on_test_batch_end = on_validation_batch_end

    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    for method in ("validate", "test"):
        with pytest.raises(RuntimeError, match="stop"):
            getattr(_trainer(callbacks=[Fail()]), method)(module, _loader(9, 20, 5), verbose=False)
    loader = _loader(0, 13, 5)
    expected = _expected(module, loader)
    for method, stage in (("validate", "val"), ("test", "test")):
        got = getattr(_trainer(), method)(module, loader, verbose=False)[0]
        assert got[f"{stage}/loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got[f"{stage}/acc"] == pytest.approx(expected["acc"])


def test_the_evaluation_loss_stays_float32_under_a_precision_that_casts_the_module():
    # bf16-true casts the module, metric states included: a bf16 sum stops growing past 256 (its spacing there is 2)
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    loader = _loader(0, 600, 100)
    got = _trainer(precision="bf16-true").validate(module, loader, verbose=False)[0]
    assert module.val_metrics["loss"].total.dtype == torch.long  # an integer state: no precision plugin casts it
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(x.to(torch.bfloat16)) for x, _ in loader]).float()
    labels = torch.cat([y for _, y in loader])
    assert got["val/loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_evaluation_logs_each_metric_once_per_dataloader_not_once_per_step(monkeypatch):
    calls = []
    original = TransferModule.log
    monkeypatch.setattr(TransferModule, "log", lambda self, name, *a, **k: calls.append(name) or original(
        self, name, *a, **k))
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    _trainer().test(module, [_loader(0, 20, 2), _loader(1, 6, 2)], verbose=False)  # 10 and 3 steps
    names = {"loss", "acc", "acc_top5", "ece"}
    assert sorted(calls) == sorted([f"test/{n}" for n in names] * 2)


def test_training_sums_survive_a_precision_plugin_that_casts_the_module():
    # bf16-true casts every floating buffer of the module to bfloat16, whose 8-bit mantissa cannot count past 256
    # exactly; the epoch's sums are kept out of its reach, so the count and the number correct stay exact
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    dm = Digits(task="target", num_shots=60, batch_size=50)  # 300 images
    trainer = _trainer(max_epochs=1, limit_val_batches=0, precision="bf16-true")
    trainer.fit(module, datamodule=dm)
    sums = module.train_sums
    assert sums.count == 300
    assert sums.loss.dtype == torch.float64
    assert sums.correct.dtype == torch.int64
    assert 0 <= int(sums.correct) <= 300
    assert float(trainer.logged_metrics["train/acc"]) == pytest.approx(int(sums.correct) / 300)


class _PerStepSums(TransferModule):
    """Also sums each step's loss and correct predictions by hand, from the head's output of that step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head.register_forward_hook(lambda _, __, out: self.__dict__.__setitem__("_last_logits", out))

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        reference = self.__dict__.setdefault("_reference", [torch.zeros((), dtype=torch.float64), 0, 0])
        reference[0].add_(loss.detach().double(), alpha=len(batch[1]))
        reference[1] += int((self._last_logits.argmax(-1) == batch[1]).sum())
        reference[2] += len(batch[1])
        return loss


def test_training_sums_equal_sums_taken_by_hand_every_step():
    module = _PerStepSums(tiny_vit(), FullFinetune(), num_classes=5)
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=13, batch_size=8))  # 65 images: 8 steps, last of 1
    loss_sum, correct, count = module._reference
    assert count == module.train_sums.count == 65
    assert float(trainer.logged_metrics["train/loss"]) == pytest.approx(float(loss_sum / count), rel=1e-6)
    assert float(trainer.logged_metrics["train/acc"]) == pytest.approx(correct / count, abs=1e-7)
    assert 0 < correct < count


def test_optimizer_groups_layer_decay_and_no_decay():
    module = TransferModule(tiny_vit(), FullFinetune(layer_decay=0.5, backbone_lr_scale=0.1), num_classes=5,
                            optimizer=lambda params: torch.optim.AdamW(params, lr=1.0, weight_decay=0.05))
    opt = module.configure_optimizers()
    depth = module.backbone.depth
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert lr_of[id(named["head.fc.weight"])] == 1.0
    assert lr_of[id(named["backbone.model.norm.weight"])] == pytest.approx(0.1)
    assert lr_of[id(named["backbone.model.blocks.0.attn.qkv.weight"])] == pytest.approx(0.1 * 0.5 ** depth)
    assert lr_of[id(named["backbone.model.patch_embed.proj.weight"])] == pytest.approx(0.1 * 0.5 ** (depth + 1))
    assert wd_of[id(named["backbone.model.blocks.0.attn.qkv.bias"])] == 0.0
    assert wd_of[id(named["backbone.model.cls_token"])] == 0.0
    assert wd_of[id(named["head.fc.weight"])] == 0.05
    assert layer_lr_scales(2, None, 1.0) == [1.0, 1.0, 1.0, 1.0]


_IMAGE_STRATEGIES = {
    "full": FullFinetune, "full_layer_decay": lambda: FullFinetune(layer_decay=0.7), "bitfit": BitFit,
    "norm_tuning": NormTuning, "partial_freeze": lambda: PartialFreeze(num_frozen_blocks=1),
    "linear_probe": LinearProbe,
}
_BACKBONES_WITH_UNUSED_PARAMETERS = {
    "cifar_resnet": lambda: CIFARResNet(depth=20),  # the checkpoint's own classifier ``linear``
    "hf_clip": tiny_clip,  # text tower, logit_scale, visual_projection
    "clip_resnet": tiny_clip_resnet,  # text tower, logit_scale
}


@pytest.mark.parametrize("backbone", sorted(_BACKBONES_WITH_UNUSED_PARAMETERS))
@pytest.mark.parametrize("strategy", sorted(_IMAGE_STRATEGIES))
def test_every_trainable_parameter_gets_a_gradient(backbone, strategy):
    # a trainable parameter the forward never uses inflates the counts and the checkpoint, and crashes DDP
    module = TransferModule(_BACKBONES_WITH_UNUSED_PARAMETERS[backbone](), _IMAGE_STRATEGIES[strategy](),
                            num_classes=3).train()
    x = inputs_for(module.backbone, batch=2)
    module.adaptation.loss(module(x), (x, torch.tensor([0, 1]))).backward()
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    assert module.parameter_counts()["trainable"] > 0


@pytest.mark.parametrize("scheduler", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.5, max_lr=1.0, step_size_up=2),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
])
def test_schedulers_keep_the_per_group_learning_rate_ratios(scheduler):
    # OneCycleLR and CyclicLR set absolute learning rates; layer decay and backbone_lr_scale must survive them
    module = TransferModule(tiny_vit(), FullFinetune(layer_decay=0.5, backbone_lr_scale=0.1), num_classes=5,
                            optimizer=lambda params: torch.optim.SGD(params, lr=1.0), lr_scheduler=scheduler)
    config = module.configure_optimizers()
    optimizer, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(3):
        optimizer.step()
        sched.step()
        scales = [g["lr_scale"] for g in optimizer.param_groups]
        ratios = [g["lr"] / s for g, s in zip(optimizer.param_groups, scales)]
        assert ratios == pytest.approx([ratios[0]] * len(ratios))
    assert scales[0] != scales[-1]
    if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):  # scaled once, not twice
        head = optimizer.param_groups[-1]
        assert head["initial_lr"] == pytest.approx(head["lr_scale"])


def test_a_warm_up_schedule_keeps_its_absolute_warm_up_then_the_per_group_ratios():
    from lightning_transfer.schedulers import WarmupCosineLR

    module = TransferModule(tiny_vit(), FullFinetune(layer_decay=0.5), num_classes=5,
                            optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
                            lr_scheduler=lambda opt: WarmupCosineLR(opt, max_epochs=10, warmup_epochs=1))
    config = module.configure_optimizers()
    optimizer, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5] * len(optimizer.param_groups))  # CoOp's
    # warm-up: one absolute lr for every group
    optimizer.step()
    sched.step()  # cosine from here: each group at its own (layer-decayed) base lr, scaled once
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def test_partial_freeze_trains_only_late_blocks():
    module = TransferModule(tiny_vit(), PartialFreeze(num_frozen_blocks=4), num_classes=5)
    trainable = {n.split(".")[3] for n, p in module.named_parameters() if p.requires_grad and ".blocks." in n}
    assert trainable == {"4", "5"}
    with pytest.raises(ValueError, match="num_frozen_blocks=9 is out of range"):
        TransferModule(tiny_vit(), PartialFreeze(num_frozen_blocks=9), num_classes=5)


def test_partial_freeze_keeps_dropout_and_drop_path_of_the_trained_blocks_on():
    backbone = tiny_vit(model_kwargs={**TINY_VIT["model_kwargs"], "drop_rate": 0.3, "drop_path_rate": 0.3})
    module = TransferModule(backbone, PartialFreeze(num_frozen_blocks=2), num_classes=5).train()
    blocks = list(module.backbone.blocks)
    assert [b.training for b in blocks] == [False, False] + [True] * (len(blocks) - 2)
    assert all(m.training for b in blocks[2:] for m in b.modules())  # drop-path inside the trained blocks too
    model = module.backbone.model
    assert not model.patch_embed.training and not model.pos_drop.training  # the frozen embedding
    assert model.training and model.norm.training  # ancestors of trained blocks, and what follows them
    x = inputs_for(module.backbone)
    assert not torch.equal(module(x), module(x))  # dropout is on in training


def test_linear_probe_keeps_backbone_in_eval_and_cache_skips_backbone():
    strategy = LinearProbe(cache_features=True)
    module = TransferModule(tiny_cnn(), strategy, num_classes=5).train()
    assert not module.backbone.training and module.head.training
    x = inputs_for(module.backbone, batch=6)
    first = module(x)
    calls = []
    handle = module.backbone.register_forward_hook(lambda *a: calls.append(1))
    second = module(x)
    handle.remove()
    assert torch.equal(first, second) and not calls and strategy.cache_hits == 6
    x2 = x.clone()
    x2[0] += 1.0  # a changed input is a miss, never a stale hit
    module(x2)
    assert strategy.cache_misses == 6 + 1


@pytest.mark.parametrize("accumulate, expected", [(1, [False] * 4), (2, [False, True, False, True])])
def test_gradients_are_freed_before_the_forward_pass_except_while_accumulating(accumulate, expected):
    # Lightning would zero them after training_step, holding the last step's gradients through the forward pass
    module = TransferModule(tiny_vit(), FullFinetune(), num_classes=5)
    held: list[bool] = []
    module.head.register_forward_pre_hook(
        lambda *_: held.append(any(p.grad is not None for p in module.parameters())) if module.training else None)
    zero_grads = _ZeroGradCounter()
    trainer = _trainer(max_steps=4 // accumulate, limit_val_batches=0, accumulate_grad_batches=accumulate,
                       callbacks=[zero_grads])
    trainer.fit(module, datamodule=Digits(task="target", num_shots=4, batch_size=5))  # 20 images: 4 batches
    assert held == expected
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)  # the last step's stay readable
    # the early free sets .grad to None itself; Lightning's own zero_grad, with nothing left to free, runs once a step
    assert zero_grads.calls == 4 // accumulate


def test_an_optimizer_with_its_own_zero_grad_is_asked_once_per_step():
    calls: list[bool] = []

    class CountingSGD(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    module = TransferModule(tiny_vit(), FullFinetune(), num_classes=5, optimizer=lambda p: CountingSGD(p, lr=0.1))
    trainer = _trainer(max_steps=2, limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=Digits(task="target", num_shots=4, batch_size=5))  # 4 batches, 2 steps
    assert calls == [True, True]


class _ZeroGradCounter(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.calls, optimizer = 0, trainer.optimizers[0]
        zero_grad = optimizer.zero_grad

        def counted(*args, **kwargs):
            self.calls += 1
            return zero_grad(*args, **kwargs)

        optimizer.zero_grad = counted


def test_lightning_still_zeroes_gradients_when_a_subclass_skips_the_early_free():
    class KeepsGradients(TransferModule):
        def on_train_batch_start(self, batch, batch_idx) -> None:  # overridden without calling super()
            pass

    module = KeepsGradients(tiny_vit(), FullFinetune(), num_classes=5,
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    grads: list[Tensor] = []
    module.head.fc.weight.register_hook(lambda g: grads.append(g.clone()))
    zero_grads = _ZeroGradCounter()
    trainer = _trainer(max_steps=2, limit_val_batches=0, callbacks=[zero_grads])
    trainer.fit(module, datamodule=Digits(task="target", num_shots=2, batch_size=5))  # 2 batches
    assert zero_grads.calls == 2
    # each step's .grad is that step's gradient alone, not the sum of both
    assert torch.allclose(module.head.fc.weight.grad, grads[-1])
    assert not torch.allclose(grads[0], grads[1])


def test_checkpoint_is_small_and_reloads_on_fresh_backbone(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    _fit_and_save(module, tmp_path / "probe.ckpt")
    state = torch.load(tmp_path / "probe.ckpt", weights_only=True)["state_dict"]
    assert set(state) == {"head.fc.weight", "head.fc.bias"}
    full = TransferModule(tiny_vit(), FullFinetune(), num_classes=5)
    _fit_and_save(full, tmp_path / "full.ckpt")
    assert (tmp_path / "probe.ckpt").stat().st_size < 0.2 * (tmp_path / "full.ckpt").stat().st_size
    loaded = TransferModule.load_from_checkpoint(tmp_path / "probe.ckpt", weights_only=True).eval()
    x = inputs_for(module.backbone)
    assert torch.equal(loaded(x), module.eval()(x))


def test_a_bf16_true_checkpoint_reloads_onto_a_fresh_fp32_backbone(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    dm = Digits(task="target", num_shots=2, batch_size=5)
    trainer = _trainer(max_steps=2, limit_val_batches=0, precision="bf16-true")
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "bf16.ckpt")  # the frozen weights it fingerprints are bf16 now
    fresh = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)  # fp32 until the precision plugin casts it
    validated = _trainer(limit_val_batches=1, precision="bf16-true").validate(
        fresh, datamodule=dm, ckpt_path=tmp_path / "bf16.ckpt", verbose=False)
    assert validated and torch.equal(fresh.head.fc.weight, module.head.fc.weight)
    other = TransferModule(TimmBackbone(**TINY_VIT), LinearProbe(), num_classes=5)  # other weights: still refused
    with pytest.raises(CheckpointMismatch, match="differ"):
        other.on_load_checkpoint(torch.load(tmp_path / "bf16.ckpt", weights_only=True))


def test_checkpoint_from_a_different_backbone_is_refused(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    _fit_and_save(module, tmp_path / "probe.ckpt")
    torch.manual_seed(123)
    other = TransferModule(TimmBackbone(**TINY_VIT), LinearProbe(), num_classes=5)  # other weights, same shapes
    checkpoint = torch.load(tmp_path / "probe.ckpt", weights_only=True)
    with pytest.raises(ValueError, match="trained on top of backbone timm:test_vit .* differ"):
        other.on_load_checkpoint(checkpoint)


def test_checkpoint_of_another_backbone_kind_names_both_backbones(tmp_path):
    from tests.helpers.tiny_clip import tiny_clip

    _fit_and_save(TransferModule(tiny_vit(), LoRA(r=2), num_classes=5), tmp_path / "lora.ckpt")
    with pytest.raises(CheckpointMismatch, match=r"trained on backbone timm:test_vit .* but this model's backbone is "
                                                 r"hf_clip:.*, another kind: build the model with model.backbone"):
        TransferModule.load_from_checkpoint(tmp_path / "lora.ckpt", weights_only=True, backbone=tiny_clip())


def test_num_classes_mismatch_is_refused(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    _fit_and_save(module, tmp_path / "probe.ckpt")
    three = TransferModule(tiny_vit(), LinearProbe(), num_classes=3)
    checkpoint = torch.load(tmp_path / "probe.ckpt", weights_only=True)
    with pytest.raises(ValueError, match="checkpoint head has 5 classes but this model has num_classes=3"):
        three.on_load_checkpoint(checkpoint)


def test_strategy_mismatch_is_refused(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    _fit_and_save(module, tmp_path / "probe.ckpt")
    partial = TransferModule(tiny_vit(), PartialFreeze(num_frozen_blocks=3), num_classes=5)
    with pytest.raises(ValueError, match="same backbone and model.adaptation"):
        partial.on_load_checkpoint(torch.load(tmp_path / "probe.ckpt", weights_only=True))
    # strategies whose keys or head shapes differ too: the message still names the two strategies
    for other in (LoRA(r=2), VQT()):
        _fit_and_save(TransferModule(tiny_vit(), other, num_classes=5), tmp_path / "other.ckpt")
        probe = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
        with pytest.raises(ValueError, match=f"trained with model.adaptation={type(other).__name__} but this model "
                                             "uses LinearProbe"):
            probe.on_load_checkpoint(torch.load(tmp_path / "other.ckpt", weights_only=True))


def test_a_merged_export_refuses_strategies_whose_weights_live_outside_the_backbone(tmp_path):
    from lightning_transfer.__main__ import main

    _fit_and_save(TransferModule(tiny_vit(), VQT(), num_classes=5), tmp_path / "vqt.ckpt")
    with pytest.raises(SystemExit, match=r"export: VQT keeps trained weights outside the backbone \(queries\)"):
        main(["export", "--ckpt_path", str(tmp_path / "vqt.ckpt"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(SystemExit, match="export: --output .*a_file' is a file"):
        main(["export", "--ckpt_path", str(tmp_path / "vqt.ckpt"), "--output", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "kept"


def test_an_optimizer_setting_torch_rejects_fails_when_the_model_is_built():
    with pytest.raises(ValueError, match="model.optimizer cannot be built: Invalid learning rate: -0.001: fix its"):
        TransferModule(tiny_vit(), LinearProbe(), num_classes=5, optimizer=lambda p: torch.optim.AdamW(p, lr=-1e-3))


def test_nothing_to_train_is_a_clear_error():
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    module.head.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        module.configure_optimizers()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"head_dropout": -0.1}, r"head_dropout must be in \[0, 1\), got -0.1"),
    ({"head_dropout": 1.0}, r"head_dropout must be in \[0, 1\), got 1.0"),
    ({"lr_scheduler_interval": "batch"}, "lr_scheduler_interval must be 'step' or 'epoch', got 'batch'"),
])
def test_bad_module_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransferModule(tiny_vit(), LinearProbe(), num_classes=5, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_backbone_lr_scale_must_be_finite_and_non_negative(value):
    with pytest.raises(ValueError, match=f"backbone_lr_scale must be a finite number >= 0, got {value}"):
        FullFinetune(backbone_lr_scale=value)


def test_lightnings_eval_mode_warning_is_silenced_for_the_frozen_backbone_and_only_there(recwarn):
    import warnings

    before = list(warnings.filters)
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    module.backbone.eval()  # frozen by design: Lightning's check would call this "unexpected behavior"
    _trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=Digits(task="target", num_shots=2, batch_size=5))
    assert not [w for w in recwarn if "eval mode at the start of training" in str(w.message)]
    assert warnings.filters == before  # nothing left behind for other modules
