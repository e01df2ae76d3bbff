"""TransferModule: backbone + adaptation strategy + head (+ test-time method), with no method-specific code."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Literal

import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_transfer import direct_step, distributed
from lightning_transfer.backbones.base import Backbone, tensors_digest
from lightning_transfer.checkpointing import capture_rng_states, restore_rng_states, use_atomic_checkpoint_io
from lightning_transfer.cuda_check import skip_nvml_check_without_gpus
from lightning_transfer.heads import LinearHead
from lightning_transfer.profiling import use_null_profiler
from lightning_transfer.schedulers import keep_lr_scales
from lightning_transfer.strategies.base import AdaptationStrategy
from lightning_transfer.test_time.base import TestTimeAdaptation

CHECKPOINT_KEY = "lightning_transfer"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model it is loaded into (another strategy, backbone or class count). It is
    raised before any step runs and names the difference and the fix, so the command line shows only the message."""


_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
# training steps whose loss and logits wait to be summed (TransferModule._fold_train_sums): at most this many, and at
# most this many bytes of logits (1000 classes at batch 256 fold every 4 steps)
_FOLD_STEPS = 64
_FOLD_BYTES = 4 * 2**20


class _MeanCrossEntropy(Metric):
    """Mean cross-entropy over every sample seen, with the ``update(preds, target)`` of the accuracy metrics, so the
    loss sits in their MetricCollection (cloned per test dataloader with them). Summed across processes under DDP, so
    the mean is over every process's samples."""

    full_state_update = False
    total: Tensor
    count: Tensor
    _SUMS = ("total", "count")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.total += nn.functional.cross_entropy(preds.float(), target, reduction="sum")
        self.count += target.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.count

    def _apply(self, fn: Any, exclude_state: Any = ()) -> nn.Module:
        # A precision plugin that casts the module (bf16-true, 16-true: module.to(dtype)) reaches metric states too,
        # and a bf16 sum stops growing (at 256 its spacing is 2): the sums only follow the module's device
        super()._apply(fn, exclude_state=(*self._SUMS, *exclude_state))  # moves self, and returns it
        for key in self._SUMS:
            setattr(self, key, getattr(self, key).to(self.device))
            self._defaults[key] = self._defaults[key].to(self.device)  # type: ignore[union-attr]
        return self


def _metrics(num_classes: int, ece_bins: int, prefix: str) -> MetricCollection:
    metrics: dict[str, Any] = {
        "loss": _MeanCrossEntropy(),
        "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "ece": MulticlassCalibrationError(num_classes, n_bins=ece_bins),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class TransferModule(LightningModule):
    """Adapt a pretrained backbone to a classification task with a pluggable adaptation strategy.

    Args:
        backbone: the pretrained network (``class_path: TimmBackbone`` ...).
        adaptation: how it is adapted (``FullFinetune``, ``LinearProbe``, ``LoRA``, ...); default LinearProbe.
        num_classes: number of classes (linked from ``data.num_classes`` by the CLI).
        class_names: class names (linked from ``data.class_names``; used by CLIP-style strategies).
        test_time: optional test-time adaptation method used by ``test`` (``BNAdapt``, ``Tent``, ``CAFA``).
        head_dropout: dropout before the linear head.
        optimizer: optimizer factory; it receives the strategy's parameter groups.
        lr_scheduler: optional scheduler factory.
        lr_scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        ece_bins: number of bins of the expected calibration error.
    """

    # the training epoch's running sums (see _reset_train_sums)
    _train_loss_sum: Tensor
    _train_correct: Tensor
    _train_count: int
    _pending_steps: list[tuple[Tensor, Tensor | None, Tensor, int]]
    _pending_bytes: int
    _grads_freed = False  # on_train_batch_start freed this step's gradients (see optimizer_zero_grad)
    # Lightning sets _current_fx_name around every hook call, about 45 times per training step, and training_step
    # counts samples in _train_count: plain (never tensor or module) attributes, for which nn.Module.__setattr__'s
    # parameter/buffer/module bookkeeping costs ~6 us each, ~0.3 ms a step.
    _PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_train_count", "_pending_bytes", "_grads_freed"})

    def __init__(
        self,
        backbone: Backbone,
        adaptation: AdaptationStrategy | None = None,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        test_time: TestTimeAdaptation | None = None,
        head_dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        ece_bins: int = 15,
    ) -> None:
        super().__init__()
        if adaptation is None:
            from lightning_transfer.strategies.linear_probe import LinearProbe

            adaptation = LinearProbe()
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}: 0.0 disables it")
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}: 'step' "
                             "steps the scheduler after every optimizer step, 'epoch' after every epoch")
        if class_names is not None and num_classes and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}; they must agree")
        self._save_hparams(backbone, adaptation, num_classes, class_names, test_time, head_dropout,
                           lr_scheduler_interval, ece_bins)
        self.num_classes = num_classes
        self.class_names = class_names
        self.backbone = backbone
        self.adaptation = adaptation
        in_features = adaptation.head_in_features(backbone)
        self.head: nn.Module | None = (
            LinearHead(in_features, num_classes, head_dropout) if in_features is not None else None
        )
        adaptation.set_class_names(class_names)  # strategies that build their classifier from names (CLIP)
        adaptation.attach(backbone, self.head)
        if not adaptation.needs_text_tower:  # image strategies: what forward never uses gets no gradient
            for name, p in backbone.named_parameters():
                if name.startswith(backbone.unused_by_forward()):
                    p.requires_grad_(False)
        self.test_time = test_time
        if test_time is not None:
            test_time.check(self)  # e.g. BNAdapt on a model without BatchNorm: now, not after data and checkpoint
        _check_optimizer(optimizer)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self._reset_train_sums()
        self.val_metrics = _metrics(num_classes, ece_bins, "val/")
        self.test_metrics = _metrics(num_classes, ece_bins, "test/")
        # backbone buffers as loaded, to tell which ones training changed (BN statistics) when saving
        self.__dict__["_initial_buffers"] = {k: v.detach().clone() for k, v in backbone.named_buffers()}
        self.__dict__["_digest_cache"] = None
        self._test_time_prepared = False

    def _save_hparams(self, backbone: Backbone, adaptation: AdaptationStrategy, num_classes: int,
                      class_names: list[str] | None, test_time: TestTimeAdaptation | None, head_dropout: float,
                      lr_scheduler_interval: str, ece_bins: int) -> None:
        if _given_hyperparameters.get() is not None:  # built by LightningCLI: it records the config itself
            self.save_hyperparameters()
            return
        # built in Python: record the same class_path/init_args shape the CLI uses, so both reload alike
        self.save_hyperparameters({
            "backbone": backbone.init_config(),
            "adaptation": adaptation.init_config(),
            "num_classes": num_classes,
            "class_names": class_names,
            "test_time": test_time.init_config() if test_time is not None else None,
            "head_dropout": head_dropout,
            "lr_scheduler_interval": lr_scheduler_interval,
            "ece_bins": ece_bins,
        })
        self.hparams["_instantiator"] = _INSTANTIATOR

    # ---- trainer set-up -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # before Lightning wraps the model (DDP) or writes a checkpoint: what every run of this module needs
        distributed.find_unused_parameters_from_flags(self.trainer, self.adaptation)
        use_atomic_checkpoint_io(self.trainer)
        use_null_profiler(self.trainer)  # Lightning's default profiler costs ~0.4 ms a step and profiles nothing
        direct_step.install(self.trainer)  # Lightning's optimization step without its layers, where it is the same
        skip_nvml_check_without_gpus()  # without a GPU, Lightning's NVML flag cost a quickstart step ~0.56 ms

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PLAIN_ATTRIBUTES and not isinstance(value, (Tensor, nn.Module)):
            object.__setattr__(self, name, value)  # what nn.Module does for such a value, minus its dict checks
        else:
            super().__setattr__(name, value)

    # ---- running ------------------------------------------------------------------------------------------
    def forward(self, inputs: Tensor) -> Tensor:
        return self.adaptation(self.backbone, self.head, inputs)  # (B, num_classes)

    def train(self, mode: bool = True) -> TransferModule:
        super().train(mode)
        self.adaptation.set_train_mode(self.backbone, self.head, mode)
        return self

    def on_fit_start(self) -> None:
        # Lightning warns, just before on_train_start, about every module in eval mode ("may lead to unexpected
        # behavior"): a frozen backbone is in eval mode by design (set_train_mode), so that one check is silenced,
        # from here to on_train_start
        self.__dict__["_quiet_eval_mode"] = quiet = warnings.catch_warnings()
        quiet.__enter__()
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                                category=PossibleUserWarning)

    def on_train_start(self) -> None:
        quiet = self.__dict__.pop("_quiet_eval_mode", None)
        if quiet is not None:
            quiet.__exit__(None, None, None)
        # Lightning (>= 2.2) keeps the modes modules are in and never calls train() at fit start, so without this
        # a frozen backbone would run in train mode: dropout on, BatchNorm statistics drifting. (Validation saves
        # and restores each module's mode, so once per fit, resumed ones included, is enough.)
        self.train()
        # A fit resumed inside an epoch gets no on_train_epoch_start for it: the epoch's sums go on from the
        # checkpoint's (every process's, summed, on rank 0: the epoch end sums over processes, whatever their count).
        # Where an epoch does start, on_train_epoch_start resets them again.
        self._reset_train_sums()
        resumed = self.__dict__.pop("_resumed_train_sums", None)
        if resumed is not None and distributed.is_rank_zero():
            loss_sum, correct, count = resumed
            self._train_loss_sum.fill_(loss_sum)
            self._train_correct.fill_(correct)
            self._train_count = count

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # a batch of plain tensors already on the device (every batch of a CPU run) has nothing to move: Lightning's
        # generic walk over the collection would rebuild the same list, one .to() per tensor, on every step
        if type(batch) in (list, tuple) and all(type(t) is Tensor and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning zeroes gradients inside its closure, after training_step: the previous step's gradients (one
        # tensor per trainable weight) stay allocated through the whole forward pass, on top of its activations.
        # Freeing them here, at the same accumulation boundary Lightning uses, lowers the training peak by the size
        # of the gradients: the peak RSS of 4 full fine-tuning steps of a ViT-B/16-shaped model (batch 8, CPU) went
        # from 3,602 and 3,618 MB to 3,291 and 3,240 MB (two runs each; 86 M fp32 gradients are 327 MB). Lightning's
        # own zero_grad is then skipped (optimizer_zero_grad below): there is nothing left to free.
        trainer = self._trainer
        if trainer is not None and self.automatic_optimization and batch_idx % trainer.accumulate_grad_batches == 0:
            for optimizer in trainer.optimizers:
                _free_gradients(optimizer)
            self._grads_freed = True

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Optimizer) -> None:
        # Lightning calls this at the same accumulation boundary, after training_step: where on_train_batch_start
        # already set this step's gradients to None, a second pass over every parameter would find nothing to do
        if self._grads_freed:
            self._grads_freed = False
        else:
            optimizer.zero_grad()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits = self(batch[0])
        loss = self.adaptation.loss(logits, batch)
        targets = batch[1]
        count = len(targets)
        # the step's loss and logits are kept (detached views) and summed every few steps (_fold_train_sums): six
        # tensor ops a step cost ~0.1 ms on a 2-core CPU right after the forward pass, as a batch of them far less
        hard = targets.ndim == 1  # hard labels (soft ones, e.g. mixed samples, have no "correct")
        self._pending_steps.append((loss.detach(), logits.detach() if hard else None, targets, count))
        self._train_count += count
        self._pending_bytes += logits.nelement() * logits.element_size() if hard else 0
        if len(self._pending_steps) >= _FOLD_STEPS or self._pending_bytes >= _FOLD_BYTES:
            self._fold_train_sums()
        connector = getattr(self._trainer, "_logger_connector", None)
        if connector is None or connector.should_update_logs:  # only the steps the loggers record
            # not prog_bar: Lightning would then convert the last logged value with .item() on every later step
            # (a device sync per step on a GPU); the CLI's progress bar shows running_train_loss() instead
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def _reset_train_sums(self) -> None:
        # Training loss and accuracy are running sums, not torchmetrics: a metric collection update plus self.log()
        # cost milliseconds a step, a visible share of a small model's step. They are plain attributes, not buffers,
        # so a precision plugin that casts the module (bf16-true) cannot round them: the loss sum stays float32 and
        # the correct count an exact int64.
        self.__dict__["_train_loss_sum"] = torch.zeros((), device=self.device)
        self.__dict__["_train_correct"] = torch.zeros((), dtype=torch.long, device=self.device)
        self.__dict__["_pending_steps"] = []  # (loss, logits or None, targets, count) of steps not yet summed
        self._pending_bytes = 0
        self._train_count = 0

    def _fold_train_sums(self) -> None:
        """Add the pending steps to the running sums: the loss step by step, in order (the same float32 sum as one
        add per step), and the correct predictions of all of them at once (an exact integer count)."""
        pending = self._pending_steps
        if not pending:
            return
        hard_logits, hard_targets = [], []
        for loss, logits, targets, count in pending:
            self._train_loss_sum.add_(loss, alpha=count)
            if logits is not None:
                hard_logits.append(logits)
                hard_targets.append(targets)
        if hard_logits:
            self._train_correct.add_(torch.cat(hard_logits).argmax(-1).eq_(torch.cat(hard_targets)).sum())
        pending.clear()
        self._pending_bytes = 0

    def running_train_loss(self) -> float | None:
        """Mean training loss of the epoch so far (None before its first batch). Reads the device: call it rarely."""
        self._fold_train_sums()
        return float(self._train_loss_sum) / self._train_count if self._train_count else None

    def on_train_epoch_start(self) -> None:
        self._reset_train_sums()  # on the device training runs on
        self._grads_freed = False  # a step that skipped Lightning's zero_grad (e.g. skipped backward) leaves it set

    def on_train_epoch_end(self) -> None:
        self._fold_train_sums()
        local = torch.stack([self._train_loss_sum.float(), self._train_correct.float(),
                             self._train_loss_sum.new_tensor(float(self._train_count))])
        sums = self.trainer.strategy.reduce(local, reduce_op="sum")  # every process's batches
        if float(sums[2]) > 0:
            self.log_dict({"train/loss": sums[0] / sums[2], "train/acc": sums[1] / sums[2]}, sync_dist=False)

    def _eval_step(self, batch: Any, batch_idx: int, metrics: MetricCollection, logits: Tensor | None = None) -> Tensor:
        if logits is None:
            logits = self(batch[0])
        metrics.update(logits, batch[1])  # loss, accuracy, top-5, ECE
        if batch_idx == 0:
            # Lightning computes a logged Metric at epoch end from all of its updates (then resets it), so logging each
            # once per dataloader gives the same numbers as logging it every step; each self.log() costs ~0.65 ms (it
            # moves the metric to the device): four a step cost 2.8 ms of a 28 ms quickstart validation step
            for name, metric in metrics.items(keep_base=False, copy_state=False):
                self.log(name, metric, prog_bar=name == "val/loss", on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, batch[1])  # the step's output, for callbacks

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, self.val_metrics)

    def on_validation_epoch_start(self) -> None:
        # Lightning resets logged metrics when an evaluation completes; one that raised part-way would leave its
        # samples in them for the next run
        self.val_metrics.reset()

    def on_test_start(self) -> None:
        self.test_metrics.reset()  # as for validation; the per-dataloader collections below are clones of it
        # one metric collection per extra test dataloader (e.g. per corruption type), so their numbers never mix
        num_loaders = len(getattr(self.trainer, "num_test_batches", None) or [0])
        self.test_metrics_per_dataloader = nn.ModuleDict(
            {str(i): self.test_metrics.clone() for i in range(1, num_loaders)})
        self._metric_attributes = None  # let Lightning find the new metric attributes when logging them
        self.__dict__["_last_test_dataloader"] = 0
        if self.test_time is not None and not self._test_time_prepared:
            self.test_time.prepare(self, getattr(self.trainer, "datamodule", None))
            self._test_time_prepared = True

    def on_test_end(self) -> None:
        # hand the model back unadapted (weights, requires_grad, BatchNorm tracking): a second trainer.test in this
        # process starts from the source model, not from where the first one's adaptation ended
        if self.test_time is not None and self._test_time_prepared:
            self.test_time.release(self)
            self._test_time_prepared = False

    def _test_metrics_for(self, dataloader_idx: int) -> MetricCollection:
        if dataloader_idx == 0:
            return self.test_metrics
        return self.test_metrics_per_dataloader[str(dataloader_idx)]  # type: ignore[return-value]

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        metrics = self._test_metrics_for(dataloader_idx)
        if self.test_time is None:
            return self._eval_step(batch, batch_idx, metrics)
        moved_on = dataloader_idx != self.__dict__.get("_last_test_dataloader", 0)
        if moved_on and self.test_time.reset_between_dataloaders:
            self.test_time.reset()
        self.__dict__["_last_test_dataloader"] = dataloader_idx
        if self.test_time.needs_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self.test_time).__name__} takes gradient steps at test time but the Trainer runs test in "
                "inference mode: set trainer.inference_mode=false (the CLI does this whenever model.test_time is set)"
            )
        with torch.enable_grad():
            logits = self.test_time.adapt(self, batch)
        return self._eval_step(batch, batch_idx, metrics, logits=logits.detach())

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(inputs).softmax(-1)

    # ---- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = self.adaptation.param_groups(self.backbone, self.head)
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise ValueError(
                f"{type(self.adaptation).__name__} leaves no trainable parameters, so there is nothing to fit: "
                "run validate/test instead, or choose a strategy that trains"
            )
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:  # per-group multipliers (layer-wise decay, backbone lr scale)
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        keep_lr_scales(scheduler, optimizer, type(self.adaptation).__name__)
        interval = self.lr_scheduler_interval
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # ---- parameters and checkpoints ----------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "total": total}

    def split_state_dict(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(kept, omitted): the frozen, unchanged pretrained backbone tensors are omitted from checkpoints."""
        # FSDP (and activation checkpointing) wrap submodules in place and insert their wrapper into parameter
        # names; state dict keys are the clean names
        trainable = {_unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}
        initial = self.__dict__["_initial_buffers"]
        kept, omitted = {}, {}
        for key, value in state.items():
            sub = key[len("backbone."):] if key.startswith("backbone.") else None
            unchanged_buffer = sub in initial and initial[sub].shape == value.shape and torch.equal(
                initial[sub], value.detach().to(initial[sub].device))
            frozen_param = sub is not None and key not in trainable and sub not in initial
            if sub is not None and (frozen_param or unchanged_buffer):
                omitted[key] = value
            else:
                kept[key] = value
        return kept, omitted

    def _omitted_digest(self, omitted: dict[str, Tensor], dtype: str | None = None) -> str:
        """The fingerprint of the frozen tensors a checkpoint leaves out; with ``dtype`` (the floating type they were
        saved in, e.g. ``torch.bfloat16`` under ``precision: bf16-true``), of this model's tensors cast to it first:
        Lightning loads a checkpoint into the model before casting it, and the cast rounds the same way both times."""
        if dtype is not None:
            target = getattr(torch, dtype.removeprefix("torch."), None)
            if not isinstance(target, torch.dtype):
                raise CheckpointMismatch(f"checkpoint names {dtype!r} as its frozen tensors' dtype, which is not a "
                                         "torch dtype: it was not written by this package; pass one written by fit")
            omitted = {k: v.to(target) if v.is_floating_point() else v for k, v in omitted.items()}
        keys = (tuple(sorted(omitted)), dtype)
        cache = self.__dict__["_digest_cache"]
        if cache is None or cache[0] != keys:
            cache = (keys, tensors_digest(omitted))
            self.__dict__["_digest_cache"] = cache
        return cache[1]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kept, omitted = self.split_state_dict(checkpoint["state_dict"])
        checkpoint["state_dict"] = kept
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": 1,
            "backbone": self.backbone.identity(),
            "adaptation": type(self.adaptation).__name__,
            "omitted_keys": len(omitted),
            "omitted_digest": self._omitted_digest(omitted),
            "omitted_dtype": _floating_dtype(omitted),
            "num_classes": self.num_classes,
            # every process's random state (collective: Lightning builds the checkpoint on every process), so a fit
            # resumed from it draws the same dropout masks and augmentations as one never interrupted
            "rng_states": distributed.gather_objects(capture_rng_states()),
            # every process's running training sums of the epoch in progress (loss sum, correct, count), so that a fit
            # resumed inside the epoch reports train/loss and train/acc over all of its batches, not only the rest
            "train_sums": distributed.gather_objects(self._folded_train_sums()),
            # the runs this checkpoint belongs to (the W&B run id), so that resuming continues the same run
            "loggers": {type(lg).__name__: str(lg.version) for lg in self._loggers() if lg.version is not None},
        }

    def _folded_train_sums(self) -> list[float | int]:
        self._fold_train_sums()
        return [float(self._train_loss_sum), int(self._train_correct), int(self._train_count)]

    def _loggers(self) -> list[Any]:
        return list(self._trainer.loggers) if self._trainer is not None else []

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Tensor] = checkpoint["state_dict"]
        state = self._test_time_state(state)
        checkpoint["state_dict"] = state
        own = self.state_dict()
        meta = checkpoint.get(CHECKPOINT_KEY)
        # the strategy first: another strategy's keys and shapes differ too, but that list would not say why
        strategy = type(self.adaptation).__name__
        if meta is not None and meta.get("adaptation", strategy) != strategy:
            raise CheckpointMismatch(
                f"checkpoint was trained with model.adaptation={meta['adaptation']} but this model uses "
                f"{strategy}: build the model with the same backbone and model.adaptation as "
                "the run that saved it (the CLI does this from the checkpoint's hyperparameters)"
            )
        # then the kind of backbone (timm, hf_clip, ...): its keys differ too, but that list would not say why
        if meta is not None and _backbone_kind(meta["backbone"]) != _backbone_kind(self.backbone.identity()):
            raise CheckpointMismatch(
                f"checkpoint was trained on backbone {meta['backbone']} but this model's backbone is "
                f"{self.backbone.identity()}, another kind: build the model with model.backbone as the run that saved "
                "it (the CLI does this from the checkpoint's hyperparameters)"
            )
        own_state = {k[len("adaptation."):]: v for k, v in state.items() if k.startswith("adaptation.")}
        try:  # a reason the strategy knows (a class-specific CoOp context on another class count) before the list
            self.adaptation.check_checkpoint_state(own_state)
        except ValueError as err:
            raise CheckpointMismatch(str(err)) from err
        self._check_shapes(state, own)
        if meta is None:  # a full checkpoint from elsewhere: strict loading does the checking
            return
        # what this model trains (parameters, the head, the strategy's tensors) must all be in the checkpoint: else
        # the count of frozen tensors below would be off by them, and its message would blame the backbone
        trained, _ = self.split_state_dict(own)
        buffers = {f"backbone.{k}" for k, _ in self.backbone.named_buffers()}  # kept only when training changed them
        lacking = [k for k in trained if k not in state and k not in buffers]
        if lacking:
            raise CheckpointMismatch(
                f"checkpoint lacks {len(lacking)} tensors this model trains ({', '.join(lacking[:4])}"
                f"{', ...' if len(lacking) > 4 else ''}): it is incomplete (edited, or not the file fit wrote), or "
                "the model is built with other settings than the run that saved it (model.adaptation's init_args, "
                "e.g. LoRA's target_modules): pass the checkpoint as fit wrote it, with the run's settings")
        self._resume_rng_states(meta.get("rng_states"))
        self._resume_train_sums(meta.get("train_sums"))
        omitted = {k: v for k, v in own.items() if k not in state}
        if len(omitted) != meta["omitted_keys"]:
            raise CheckpointMismatch(
                f"checkpoint was saved from a model whose frozen backbone had {meta['omitted_keys']} tensors, but this "
                f"model has {len(omitted)} tensors the checkpoint does not hold: build it with the same backbone and "
                f"model.adaptation as the run that saved it (checkpoint backbone: {meta['backbone']})"
            )
        if self._omitted_digest(omitted, meta.get("omitted_dtype")) != meta["omitted_digest"]:
            if "random init" in meta["backbone"]:
                raise CheckpointMismatch(
                    f"checkpoint was trained on a randomly initialised frozen backbone ({meta['backbone']}), whose "
                    "weights a checkpoint cannot rebuild: train on pretrained weights or a checkpoint_path, or with a "
                    "strategy that trains the whole backbone"
                )
            raise CheckpointMismatch(
                f"checkpoint was trained on top of backbone {meta['backbone']}, but this model's frozen backbone "
                f"weights ({self.backbone.identity()}) differ from those: load the same pretrained weights "
                "(model.backbone pretrained/checkpoint_path) the run used"
            )
        checkpoint["state_dict"] = {**omitted, **state}

    def _resume_rng_states(self, states: list[dict[str, Any]] | None) -> None:
        """When a fit resumes from this checkpoint (not when weights are loaded for testing or inference)."""
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        rank, world = distributed.rank_and_world()
        if fitting and states and len(states) == world:  # with another process count the shards differ anyway
            restore_rng_states(states[rank])

    def _resume_train_sums(self, sums: list[list[float]] | None) -> None:
        """Keep the checkpoint's training sums for :meth:`on_train_start` when a fit resumes from it."""
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        if fitting and sums:
            self.__dict__["_resumed_train_sums"] = (
                sum(float(s[0]) for s in sums), sum(int(s[1]) for s in sums), sum(int(s[2]) for s in sums))

    def _test_time_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A test-time method's saved state (CAFA statistics) loads only into a model that has one; a model with a
        test-time method loads checkpoints without that state (trained before it was chosen) as they are."""
        prefix = "test_time."
        if self.test_time is None:
            return {k: v for k, v in state.items() if not k.startswith(prefix)}
        self.test_time.fit_state_shapes({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        own = {f"{prefix}{k}": v for k, v in self.test_time.state_dict().items()}
        return {**own, **state}

    def _check_shapes(self, state: dict[str, Tensor], own: dict[str, Tensor]) -> None:
        head_w = "head.fc.weight"
        if head_w in state and head_w in own and state[head_w].shape[0] != own[head_w].shape[0]:
            raise CheckpointMismatch(
                f"checkpoint head has {state[head_w].shape[0]} classes but this model has num_classes="
                f"{self.num_classes} (from the data): test on data with the classes the model was trained on, or "
                "train a new head"
            )
        unexpected = [k for k in state if k not in own]
        bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
               for k in state if k in own and state[k].shape != own[k].shape]
        if unexpected or bad:
            raise CheckpointMismatch(
                "checkpoint does not match this model: "
                + (f"unexpected keys {unexpected[:6]}; " if unexpected else "")
                + (f"shape mismatches {bad[:6]}; " if bad else "")
                + "build the model with the same backbone and model.adaptation as the run that saved it"
            )


# Lightning reads training_step's parameters with inspect.getfullargspec on every training step (to decide whether to
# pass batch_idx); with the signature precomputed that is a lookup, not a parse of the function: ~150 to ~65 us a step.
setattr(TransferModule.training_step, "__signature__", inspect.signature(TransferModule.training_step))  # noqa: B010


def _check_optimizer(factory: OptimizerCallable) -> None:
    """Build the optimizer once on a throwaway parameter, so a setting torch rejects (a negative lr, betas outside
    [0, 1)) fails when the model is built, naming the setting, not after the fit has started and a run was logged."""
    try:
        factory([nn.Parameter(torch.zeros(1))])
    except ValueError as err:
        raise ValueError(f"model.optimizer cannot be built: {err}: fix its init_args (e.g. "
                         "--model.optimizer.init_args.lr=1e-3)") from err
    except Exception:  # noqa: BLE001  a factory that needs more than a parameter list: configure_optimizers will say
        pass


def _floating_dtype(tensors: dict[str, Tensor]) -> str | None:
    """The dtype of the floating tensors (one, as a precision plugin casts them all), e.g. ``torch.float32``."""
    return next((str(t.dtype) for t in tensors.values() if t.is_floating_point()), None)


def _backbone_kind(identity: str) -> str | None:
    """``timm`` of ``timm:vit_base_patch16_224 (pretrained)``; None for identities without a kind prefix."""
    kind, colon, _ = identity.partition(":")
    return kind if colon and " " not in kind else None


def _unwrapped_name(name: str) -> str:
    """A parameter name without the wrapper modules FSDP and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _free_gradients(optimizer: Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``; for torch's own zero_grad, done directly.

    Torch's zero_grad sets each parameter's ``.grad`` to None inside a profiler record and a dynamo guard, which cost
    ~90 us a training step here against ~7 us for the loop itself. An optimizer with a zero_grad of its own gets that.
    """
    if type(optimizer).zero_grad is not Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
