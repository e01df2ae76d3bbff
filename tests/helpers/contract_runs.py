"""The core contracts' parts (tests/helpers/contract_parts.py) run the same way in one process and under 2-process
DDP: ``tests/helpers/distributed_runs.py`` calls :func:`contract_run` with ``devices=2`` and
``tests/test_distributed.py`` compares with one process and twice the batch (the same global batch)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_transfer.datamodules import Digits
from lightning_transfer.datamodules.paired import PairedDomains
from lightning_transfer.heads import fit_closed_form_head
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.linear_probe import LinearProbe
from tests.helpers.contract_parts import (
    DistanceToMean,
    NearestMeanHead,
    OneClassDigits,
    ProjectedEmbedding,
    RetrievalDigits,
    TeacherHint,
    TwoStreamProbe,
)
from tests.helpers.models import tiny_vit

CONTRACT_KEYS = ["two_stream", "teacher", "closed_form_head", "retrieval", "anomaly_detection"]


def _trainer(devices: int, **kw: Any) -> Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
          "num_sanity_val_steps": 0, **kw}
    return Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", **kw)


def _build(key: str, batch_size: int) -> tuple[TransferModule, Any]:
    if key == "two_stream":
        source = Digits(task="target", num_shots=6, batch_size=batch_size, seed=1)  # 30 labelled source images
        target = Digits(task="target", num_shots=4, batch_size=batch_size, seed=2)  # 20 unlabelled target images
        return TransferModule(tiny_vit(), TwoStreamProbe(), num_classes=5), PairedDomains(source, target)
    digits = Digits(task="target", num_shots=4, batch_size=batch_size)
    if key == "teacher":
        return TransferModule(tiny_vit(), TeacherHint(teacher_backbone=tiny_vit()), num_classes=5), digits
    if key == "closed_form_head":
        return TransferModule(tiny_vit(), LinearProbe(), num_classes=5, head=NearestMeanHead()), digits
    if key == "retrieval":
        return (TransferModule(tiny_vit(), ProjectedEmbedding(), num_classes=5, task="retrieval"),
                RetrievalDigits(batch_size=batch_size))
    if key == "anomaly_detection":
        return (TransferModule(tiny_vit(), LinearProbe(), num_classes=1, head=DistanceToMean(),
                               task="anomaly_detection"), OneClassDigits(batch_size=4 * batch_size))
    raise KeyError(key)


def contract_run(key: str, devices: int, batch_size: int) -> dict[str, Any]:
    """Fit 2 epochs (test, for anomaly detection: its closed-form head alone has nothing DDP could synchronise) and
    return the trained parameters and metrics."""
    seed_everything(0, verbose=False)
    module, data = _build(key, batch_size)
    out: dict[str, Any] = {}
    if key == "anomaly_detection":
        try:  # nothing trains: DDP is refused with the fix
            _trainer(devices, max_epochs=1).fit(module, datamodule=data)
        except ValueError as err:
            out["fit_error"] = str(err)
        data.set_data_config(module.backbone.data_config())
        data.setup("fit")
        module.head.fitted.fill_(False)
        fit_closed_form_head(module, torch.utils.data.DataLoader(data.datasets["train"], batch_size=64))
        trainer = _trainer(devices)
        trainer.test(module, datamodule=data, verbose=False)
    else:
        limit = 2 if key == "retrieval" else 1.0  # the retrieval set is large; 2 steps of each epoch suffice
        trainer = _trainer(devices, max_epochs=2, limit_train_batches=limit, limit_val_batches=0)
        trainer.fit(module, datamodule=data)
    # epoch metrics (summed over the processes); a step's loss is its own process's
    out["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                      if k.startswith(("train/", "test/")) and not k.endswith("_step")}
    out["params"] = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    if module.head is not None and hasattr(module.head, "fitted"):
        out["head"] = {k: v.detach().clone() for k, v in module.head.state_dict().items()}
    return out
