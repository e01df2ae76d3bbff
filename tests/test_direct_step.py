"""The direct optimization step (lightning_transfer/direct_step.py) does what Lightning's automatic optimization does:
the same weights, metrics, step counters, step outputs and hooks (order, arguments, ``_current_fx_name``), and it
hands every case it does not cover back to Lightning's loop."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import direct_step
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import FullFinetune, LinearProbe
from tests.helpers.models import inputs_for, tiny_cnn, tiny_vit

HOOKS = ("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step")


class Record(Callback):
    """Every optimization hook a callback gets, with the module's _current_fx_name and what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _note(self, hook: str, pl_module, *args) -> None:
        described = tuple(round(float(a), 6) if isinstance(a, torch.Tensor) else a if isinstance(a, str)
                          else type(a).__name__ for a in args)
        self.calls.append((hook, pl_module._current_fx_name, described))

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self._note("cb.on_before_zero_grad", pl_module, optimizer)

    def on_before_backward(self, trainer, pl_module, loss):
        self._note("cb.on_before_backward", pl_module, loss)

    def on_after_backward(self, trainer, pl_module):
        self._note("cb.on_after_backward", pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        self._note("cb.on_before_optimizer_step", pl_module, optimizer, sum(grads, torch.tensor(0.0)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._note("cb.on_train_batch_end", pl_module, *(f"{k}={float(v):.6f}" for k, v in outputs.items()))


class Hooked(TransferModule):
    """A module overriding every hook the direct step replays, logging from one of them as users do."""

    def _note(self, hook: str, *args) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, Record):
                callback._note(hook, self, *args)

    def on_before_zero_grad(self, optimizer):
        self._note("on_before_zero_grad", optimizer)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self._note("optimizer_zero_grad", optimizer)
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def on_before_backward(self, loss):
        self._note("on_before_backward", loss)

    def backward(self, loss, *args, **kwargs):
        self._note("backward", loss)
        super().backward(loss, *args, **kwargs)

    def on_after_backward(self):
        self._note("on_after_backward")

    def on_before_optimizer_step(self, optimizer):
        self._note("on_before_optimizer_step", optimizer)
        self.log("grad/head_norm", self.head.fc.weight.grad.norm(), on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self._note("configure_gradient_clipping", optimizer, torch.tensor(float(gradient_clip_val or 0)))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _loader(backbone, batches: int = 3, batch: int = 6) -> DataLoader:
    x = inputs_for(backbone, batch * batches)
    y = torch.randint(0, 5, (batch * batches,), generator=torch.Generator().manual_seed(2))
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _fit(monkeypatch, direct: bool, module_cls=TransferModule, strategy=FullFinetune, backbone=tiny_vit,
         optimizer=None, epochs: int = 2, callbacks=(), **trainer_kw):
    """One seeded fit, through the direct step or (``direct=False``) Lightning's loop; (trainer, module, record)."""
    monkeypatch.setenv(direct_step.ENV_SWITCH, "1" if direct else "0")
    torch.manual_seed(0)
    kw = {"optimizer": optimizer} if optimizer is not None else {}
    module = module_cls(backbone(), strategy(), num_classes=5, **kw)
    record = Record()
    trainer_kw = {"accelerator": "cpu", **trainer_kw}
    trainer = Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[record, *callbacks], **trainer_kw)
    trainer.fit(module, train_dataloaders=_loader(module.backbone))
    return trainer, module, record


def _direct_steps(trainer: Trainer) -> int | None:
    return getattr(trainer.fit_loop.epoch_loop.automatic_optimization, "direct_steps", None)


def _assert_same_fit(a, b, exact: bool = True) -> None:
    """Bit for bit on the CPU; on a GPU (``exact=False``), whose kernels may sum in another order from run to run,
    the same hooks and counters and weights within float tolerance."""
    (ta, ma, ra), (tb, mb, rb) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    if exact:
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"weights differ: {different[:5]}"
        assert ({k: float(v) for k, v in ta.callback_metrics.items()}
                == {k: float(v) for k, v in tb.callback_metrics.items()})
        assert ra.calls == rb.calls
    else:
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4, msg=k)
        assert [c[:2] for c in ra.calls] == [c[:2] for c in rb.calls]
    assert ta.global_step == tb.global_step
    assert ta.fit_loop.state_dict() == tb.fit_loop.state_dict()  # progress counters, as checkpoints save them


@pytest.mark.parametrize("strategy", [FullFinetune, LinearProbe])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_direct_fit_ends_where_lightnings_loop_ends(monkeypatch, strategy, precision):
    direct = _fit(monkeypatch, True, strategy=strategy, precision=precision)
    lightning = _fit(monkeypatch, False, strategy=strategy, precision=precision)
    assert _direct_steps(direct[0]) == 6 and _direct_steps(lightning[0]) is None  # 2 epochs of 3 batches
    assert type(lightning[0].fit_loop.epoch_loop.automatic_optimization) is _AutomaticOptimization
    _assert_same_fit(direct, lightning)
    assert [c[0] for c in direct[2].calls[:5]] == ["cb.on_before_zero_grad", "cb.on_before_backward",
                                                   "cb.on_after_backward", "cb.on_before_optimizer_step",
                                                   "cb.on_train_batch_end"]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_every_hook_runs_in_lightnings_order_with_its_name_arguments_and_logging(monkeypatch, clip):
    direct = _fit(monkeypatch, True, module_cls=Hooked, gradient_clip_val=clip)
    lightning = _fit(monkeypatch, False, module_cls=Hooked, gradient_clip_val=clip)
    assert _direct_steps(direct[0]) == 6
    _assert_same_fit(direct, lightning)
    first_step = [(hook, fx) for hook, fx, _ in direct[2].calls[:12]]
    assert first_step == [
        ("cb.on_before_zero_grad", "on_before_zero_grad"), ("on_before_zero_grad", "on_before_zero_grad"),
        ("optimizer_zero_grad", "optimizer_zero_grad"),
        ("cb.on_before_backward", "on_before_backward"), ("on_before_backward", "on_before_backward"),
        ("backward", "backward"),
        ("cb.on_after_backward", "on_after_backward"), ("on_after_backward", "on_after_backward"),
        ("cb.on_before_optimizer_step", "on_before_optimizer_step"),
        ("on_before_optimizer_step", "on_before_optimizer_step"),
        ("configure_gradient_clipping", "configure_gradient_clipping"),
        ("cb.on_train_batch_end", "on_train_batch_end")]
    assert "grad/head_norm" in direct[0].callback_metrics  # self.log from a hook the direct step called


class ClosureTwice(torch.optim.SGD):
    """Evaluates the closure twice per step (as sharpness-aware and line-search optimizers do)."""

    def step(self, closure=None):
        closure()
        return super().step(closure)


def test_an_optimizer_that_calls_the_closure_twice_gets_the_same_steps(monkeypatch):
    twice = lambda params: ClosureTwice(params, lr=0.1)  # noqa: E731
    direct = _fit(monkeypatch, True, module_cls=Hooked, strategy=LinearProbe, optimizer=twice, epochs=1)
    lightning = _fit(monkeypatch, False, module_cls=Hooked, strategy=LinearProbe, optimizer=twice, epochs=1)
    assert _direct_steps(direct[0]) == 3
    _assert_same_fit(direct, lightning)
    assert sum(hook == "backward" for hook, _, _ in direct[2].calls) == 6  # two closure calls per step


class SkipsOddSteps(TransferModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 2 else {"loss": loss, "batch_size": torch.tensor(float(len(batch[1])))}


def test_a_skipped_step_and_extra_outputs_are_handled_as_lightning_does(monkeypatch):
    direct = _fit(monkeypatch, True, module_cls=SkipsOddSteps)
    lightning = _fit(monkeypatch, False, module_cls=SkipsOddSteps)
    assert _direct_steps(direct[0]) == 6
    _assert_same_fit(direct, lightning)
    ends = [args for hook, _, args in direct[2].calls if hook == "cb.on_train_batch_end"]
    assert ends[1] == () and ends[0][1] == "batch_size=6.000000"  # a skipped step's output is {}


class OwnOptimizerStep(TransferModule):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)


class Accumulates(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        trainer.accumulate_grad_batches = 2 if trainer.current_epoch else 1


@pytest.mark.parametrize("case", ["accumulation", "accumulation from epoch 1", "own optimizer_step", "profiler",
                                  "switched off"])
def test_what_the_direct_step_does_not_cover_runs_through_lightnings_loop(monkeypatch, tmp_path, case):
    kw: dict = {}
    module_cls = TransferModule
    expected_direct = 0
    if case == "accumulation":
        kw["accumulate_grad_batches"] = 2
    elif case == "accumulation from epoch 1":
        kw["callbacks"] = [Accumulates()]
        expected_direct = 3  # epoch 0 direct; epoch 1 accumulates, so Lightning's loop
    elif case == "own optimizer_step":
        module_cls = OwnOptimizerStep
    elif case == "profiler":
        kw["profiler"] = SimpleProfiler(dirpath=tmp_path, filename="profile")
    direct = _fit(monkeypatch, case != "switched off", module_cls=module_cls, **kw)
    lightning = _fit(monkeypatch, False, module_cls=module_cls, **kw)
    steps = _direct_steps(direct[0])
    assert (steps or 0) == expected_direct
    if case == "switched off":
        assert steps is None  # not even installed
    _assert_same_fit(direct, lightning)


def test_batchnorm_backbones_match_too(monkeypatch):
    _assert_same_fit(_fit(monkeypatch, True, backbone=tiny_cnn), _fit(monkeypatch, False, backbone=tiny_cnn))


class NeverCallsClosure(torch.optim.SGD):
    def step(self, closure=None):
        return None


def test_an_optimizer_that_never_runs_the_closure_is_named(monkeypatch):
    with pytest.raises(Exception, match="NeverCallsClosure.step"):
        _fit(monkeypatch, True, optimizer=lambda p: NeverCallsClosure(p, lr=0.1), epochs=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_on_a_gpu_a_direct_fit_ends_where_lightnings_loop_ends(monkeypatch, precision):
    direct = _fit(monkeypatch, True, precision=precision, accelerator="cuda", devices=1)
    lightning = _fit(monkeypatch, False, precision=precision, accelerator="cuda", devices=1)
    # 16-mixed has a gradient scaler, which only Lightning's loop handles
    assert _direct_steps(direct[0]) == (0 if precision == "16-mixed" else 6)
    _assert_same_fit(direct, lightning, exact=False)
