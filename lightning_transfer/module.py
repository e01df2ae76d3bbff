"""TransferModule: backbone + adaptation strategy + head (+ test-time method). It composes and delegates: the
strategy computes the training loss from whatever its datamodule yields and owns its parameter groups; ``metrics``
gives the task's metrics; ``checkpointing`` decides what a checkpoint holds and whether one fits; the test-time
session runs the test-time method; a closed-form head is fitted by ``heads.fit_closed_form_head``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_transfer import distributed
from lightning_transfer._config import build_component
from lightning_transfer.assembly import assemble
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.callbacks.housekeeping import AtomicCheckpoints, FreeGradientsEarly, QuietByDesign
from lightning_transfer.checkpointing import (
    CHECKPOINT_KEY,
    CheckpointFormat,
    CheckpointMismatch,
    capture_rng_states,
    restore_process_rng,
)
from lightning_transfer.heads import Head, fit_closed_form_head
from lightning_transfer.metrics import TrainingSums, get_task
from lightning_transfer.schedulers import build_optimization, check_optimizer_factory
from lightning_transfer.strategies.base import AdaptationStrategy
from lightning_transfer.test_time.base import TestTimeAdaptation
from lightning_transfer.test_time.session import TestTimeSession

__all__ = ["CHECKPOINT_KEY", "CheckpointMismatch", "TransferModule"]

def _config_of(component: Any) -> dict[str, Any] | None:
    return component.init_config() if component is not None else None


def _trainer_of(module: LightningModule) -> Trainer | None:
    try:
        return module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None


class TransferModule(LightningModule):
    """Adapt a pretrained backbone to a task with a pluggable adaptation strategy.

    Args:
        backbone: the pretrained network (``class_path: TimmBackbone`` ...).
        adaptation: how it is adapted (``FullFinetune``, ``LinearProbe``, ``LoRA``, ...); default LinearProbe.
        num_classes: number of classes (linked from ``data.num_classes`` by the CLI).
        class_names: class names (linked from ``data.class_names``; used by CLIP-style strategies).
        test_time: optional test-time adaptation method used by ``test`` (``BNAdapt``, ``Tent``, ``CAFA``); chosen
            when testing, so it is not recorded with the trained model.
        head: the head on the strategy's features (default: a linear head with ``head_dropout``).
        head_dropout: dropout before the default linear head.
        task: what the outputs are measured as (linked from ``data.task``): ``classification``,
            ``anomaly_detection`` or ``retrieval``.
        optimizer: optimizer factory; it receives the strategy's parameter groups.
        lr_scheduler: optional scheduler factory.
        lr_scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        ece_bins: number of bins of the expected calibration error.
    """

    def __init__(
        self,
        backbone: Backbone,
        adaptation: AdaptationStrategy | None = None,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        test_time: TestTimeAdaptation | None = None,
        head: Head | None = None,
        head_dropout: float = 0.0,
        task: str = "classification",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        ece_bins: int = 15,
    ) -> None:
        super().__init__()
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}: 'step' "
                             "steps the scheduler after every optimizer step, 'epoch' after every epoch")
        self.task = get_task(task)
        # load_from_checkpoint passes the components as the class_path/init_args configs they were recorded as
        parts = assemble(backbone, adaptation, num_classes, class_names, head, head_dropout)
        self.backbone, self.adaptation, self.head = parts
        # one record, whether built by the CLI or in Python: each component's class_path/init_args, **kwargs included
        self.save_hyperparameters({
            "backbone": self.backbone.init_config(), "adaptation": self.adaptation.init_config(),
            "num_classes": num_classes, "class_names": class_names, "head": _config_of(parts[2] if head else None),
            "head_dropout": head_dropout, "task": task, "lr_scheduler_interval": lr_scheduler_interval,
            "ece_bins": ece_bins})
        self.num_classes = num_classes
        self.class_names = class_names
        self.test_time = build_component(test_time, TestTimeAdaptation)
        if self.test_time is not None:
            self.test_time.check(self)  # e.g. BNAdapt on a model without BatchNorm: now, not after data and checkpoint
        check_optimizer_factory(optimizer)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.val_metrics = self.task.metrics(num_classes, ece_bins, "val/")
        # one collection per test dataloader (e.g. per corruption type), so their numbers never mix
        self.test_metrics: dict[str, MetricCollection] = nn.ModuleDict(  # type: ignore[assignment]
            {"0": self.task.metrics(num_classes, ece_bins, "test/")})
        self.train_sums = TrainingSums()
        self.checkpoint_format = CheckpointFormat(self)
        self.test_session = TestTimeSession()
        # a closed-form head with nothing else to train: no optimizer, no training steps
        self.automatic_optimization = self.adaptation.trains_nothing or any(p.requires_grad for p in self.parameters())

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint (always maximised): the task's."""
        return f"val/{self.task.monitor}"

    # ---- running ------------------------------------------------------------------------------------------
    def forward(self, inputs: Tensor) -> Tensor:
        return self.adaptation(self.backbone, self.head, inputs)  # (B, num_classes) or the task's outputs

    def train(self, mode: bool = True) -> TransferModule:
        super().train(mode)
        self.adaptation.set_train_mode(self.backbone, self.head, mode)
        return self

    def configure_callbacks(self) -> list[Callback]:
        return [AtomicCheckpoints(), FreeGradientsEarly(), QuietByDesign()]

    def setup(self, stage: str) -> None:
        trainer = _trainer_of(self)
        if stage == "fit" and not self.automatic_optimization and trainer is not None and trainer.world_size > 1:
            raise ValueError(
                f"nothing trains but the closed-form head {type(self.head).__name__}, so DDP has nothing to "
                "synchronise (and refuses a model without trainable parameters): fit on one device "
                "(trainer.devices=1); the head's one pass over the training features is the whole fit")

    def on_train_start(self) -> None:
        # Lightning (>= 2.2) keeps the modes modules are in and never calls train() at fit start, so without this
        # a frozen backbone would run in train mode: dropout on, BatchNorm statistics drifting
        self.train()
        self.train_sums.start(self.device, distributed.is_rank_zero())
        fit_closed_form_head(self, self.trainer.train_dataloader or [])

    def on_train_epoch_start(self) -> None:
        # a fit resumed inside an epoch gets no on_train_epoch_start for it: its sums go on from the checkpoint's
        self.train_sums.reset(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if not self.automatic_optimization:  # a closed-form head alone: fitted at the start, nothing to step
            return None
        step = self.adaptation.training_loss(self.backbone, self.head, batch)
        self.train_sums.update(step)
        size = len(step.targets) if step.targets is not None else None
        self.log("train/loss_step", step.loss.detach(), on_step=True, on_epoch=False, batch_size=size)
        return step.loss

    def running_train_loss(self) -> float | None:
        """Mean training loss of the epoch so far (None before its first batch). Reads the device: call it rarely."""
        return self.train_sums.running_loss()

    def on_train_epoch_end(self) -> None:
        means = self.train_sums.epoch_means(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        if means:
            self.log_dict(means, sync_dist=False)  # already summed over every process's batches

    def _evaluate(self, batch: Any, batch_idx: int, metrics: MetricCollection, attribute: str,
                  outputs: Tensor | None = None) -> None:
        outputs = self(batch[0]) if outputs is None else outputs
        metrics.update(outputs, self.task.target(batch))
        if batch_idx == 0:
            # Lightning computes a logged Metric at epoch end from all of its updates (then resets it), so logging each
            # once per dataloader gives the same numbers as logging it every step, for a fraction of the cost
            for name, metric in metrics.items(keep_base=True, copy_state=False):
                self.log(f"{metrics.prefix}{name}", metric, prog_bar=name in ("loss", self.task.monitor), on_step=False,
                         on_epoch=True, metric_attribute=f"{attribute}.{name}")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.val_metrics, "val_metrics")

    def on_validation_epoch_start(self) -> None:
        # Lightning resets logged metrics when an evaluation completes; one that raised part-way would leave its
        # samples in them for the next run
        self.val_metrics.reset()

    def on_test_start(self) -> None:
        for key in [k for k in self.test_metrics if k != "0"]:
            del self.test_metrics[key]
        self.test_metrics["0"].reset()
        self.test_session.start(self.test_time, self, getattr(self.trainer, "datamodule", None))

    def on_test_end(self) -> None:
        self.test_session.end(self.test_time, self)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        key = str(dataloader_idx)
        if key not in self.test_metrics:
            self.test_metrics[key] = self.test_metrics["0"].clone()
            self.test_metrics[key].reset()
        outputs = None
        if self.test_time is not None:
            outputs = self.test_session.predict(self.test_time, self, batch, dataloader_idx)
        self._evaluate(batch, batch_idx, self.test_metrics[key], f"test_metrics.{key}", outputs)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.task.prediction(self(inputs))

    # ---- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if not self.automatic_optimization:
            return None
        groups = self.adaptation.param_groups(self.backbone, self.head)
        return build_optimization(groups, self.optimizer_factory, self.lr_scheduler_factory,
                                  self.lr_scheduler_interval, type(self.adaptation).__name__)

    # ---- parameters and checkpoints ----------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        params = list(self.parameters())
        return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = _trainer_of(self)
        loggers = trainer.loggers if trainer is not None else []
        self.checkpoint_format.save(self, checkpoint, extra={
            # every process's random state (collective: Lightning builds the checkpoint on every process), so a fit
            # resumed from it draws the same dropout masks and augmentations as one never interrupted
            "rng_states": distributed.gather_objects(capture_rng_states()),
            # every process's running training sums, so a fit resumed inside the epoch reports all of its batches
            "train_sums": distributed.gather_objects(self.train_sums.state()),
            # the runs this checkpoint belongs to (the W&B run id), so that resuming continues the same run
            "loggers": {type(lg).__name__: str(lg.version) for lg in loggers if lg.version is not None},
        })

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = self.checkpoint_format.load(self, checkpoint)
        trainer = _trainer_of(self)
        if meta is not None and trainer is not None and trainer.state.fn == "fit":  # resuming, not evaluating
            restore_process_rng(meta.get("rng_states"))
            self.train_sums.resume(meta.get("train_sums"))
