"""Small fits and tests that run the same way in one process and under 2-process CPU DDP, for comparing the two.

``python tests/helpers/distributed_runs.py OUT_DIR`` runs every registered strategy (fit) and every test-time method
(test) with ``Trainer(strategy="ddp", devices=2, accelerator="cpu")`` (Lightning re-launches this script for rank 1)
and saves what each rank ends with to ``OUT_DIR/rank<r>.pt``. ``tests/test_distributed.py`` runs the same functions
in one process with twice the batch (the same global batch) and compares.

What makes the two exactly comparable: the training sampler (``EpochShuffleSampler``) draws one permutation per epoch
from the seed and gives rank r every 2nd index of it, so a DDP step's two batches together are the single process's
batch; losses are batch means, which DDP's gradient average turns into the mean over the global batch; the cases
chosen have no dropout and no BatchNorm in batch-statistics mode (:func:`comparable_case`); data sizes are even, so
no sampler pads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make `tests` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_transfer import distributed
from lightning_transfer.checkpointing import AtomicCheckpointIO
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.registry import STRATEGIES
from lightning_transfer.strategies.linear_probe import LinearProbe
from tests.helpers import tta_methods
from tests.helpers.models import BACKBONE_FACTORIES
from tests.strategies.test_contract import CASES, _build

PER_RANK_BATCH = 5
NUM_SHOTS = 4  # 5 classes x 4 shots = 20 training and 20 validation images: 2 steps per epoch either way
# test-time methods: (registry name, init args over its YAML's, backbone): every registered method on every backbone
# it claims, plus option variants; the BatchNorm ones exercise the global batch statistics
TEST_TIME_CASES = [(name, {}, kind) for name, kind in tta_methods.CASES] + [("cafa", {"covariance": "tied"}, "vit")]
TEST_BATCHES = 3


def _batch_dependent(module: TransferModule) -> bool:
    """Whether a training step's result depends on how the batch is split: dropout (each process draws its own masks)
    or BatchNorm normalising with batch statistics (each process would use its half batch)."""
    module.train()
    batch_norm = distributed.BATCH_NORM_TYPES
    return any(m.training and ((isinstance(m, nn.Dropout) and m.p > 0) or isinstance(m, batch_norm))
               for m in module.modules())


def comparable_case(key: str) -> tuple[str, dict, str]:
    """(strategy, case, backbone) for a key of :func:`run_keys`: the first contract case of the strategy whose result
    does not depend on how the batch is split; ``linear_probe_cache`` is LinearProbe with its (shared) feature cache."""
    if key == "linear_probe_cache":
        return "linear_probe", {"init_args": {"cache_features": True}}, "vit"
    cls = STRATEGIES.get(key)
    for case in CASES.get(key, []):
        for kind in case.get("backbones") or (["vit"] if cls.needs_tokens else ["vit", "cnn"]):
            if not _batch_dependent(_build(key, case, kind)):
                return key, case, kind
    raise AssertionError(f"strategy {key!r} has no contract case whose training step is independent of the batch "
                         "split (no dropout, no BatchNorm in batch-statistics mode): add one to tests/strategies")


def run_keys() -> list[str]:
    return [*sorted(STRATEGIES.names()), "linear_probe_cache"]


def _trainer(devices: int, **kw: Any) -> Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
          "num_sanity_val_steps": 0, **kw}
    return Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", **kw)


def _digits(module: TransferModule, batch_size: int) -> Digits:
    dm = Digits(task="target", num_shots=NUM_SHOTS, batch_size=batch_size)
    dm.set_data_config(module.backbone.data_config())
    return dm


def fit_strategy(name: str, case: dict, kind: str, devices: int, batch_size: int,
                 checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Fit 2 epochs (validate for strategies that train nothing); the metrics and trainable parameters it ends with.

    With ``checkpoint_dir``, a checkpoint is written after every step, and the result counts this process's writes.
    """
    seed_everything(0, verbose=False)
    module = _build(name, case, kind)
    saves = {"count": 0}
    if checkpoint_dir is None:
        trainer = _trainer(devices, max_epochs=2)
    else:
        every_step = ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, every_n_train_steps=1)
        trainer = _trainer(devices, max_epochs=2, enable_checkpointing=True, callbacks=[every_step])
        save = AtomicCheckpointIO.save_checkpoint

        def counted(io: AtomicCheckpointIO, *args: Any, **kw: Any) -> None:
            saves["count"] += 1
            save(io, *args, **kw)

        AtomicCheckpointIO.save_checkpoint = counted  # type: ignore[method-assign]
    if module.adaptation.trains_nothing:
        trainer.validate(module, datamodule=_digits(module, batch_size), verbose=False)
    else:
        trainer.fit(module, datamodule=_digits(module, batch_size))
    out: dict[str, Any] = {
        # validation metrics, and the training epoch's loss and accuracy (summed over the processes' batches)
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith("val/") or k in ("train/loss", "train/acc")},
        "params": {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
        "find_unused_parameters": getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters"),
    }
    if checkpoint_dir is not None:
        AtomicCheckpointIO.save_checkpoint = save  # type: ignore[method-assign]
        out["checkpoint_writes"] = saves["count"]
        out["last_checkpoint"] = str(checkpoint_dir / "last.ckpt")
    if isinstance(module.adaptation, LinearProbe):
        probe = module.adaptation
        out["cache"] = {"size": len(probe._cache), "hits": probe.cache_hits, "misses": probe.cache_misses}
    return out


def test_time_run(name: str, init_args: dict, kind: str, devices: int, batch_size: int) -> dict[str, Any]:
    """Test an untrained linear probe with a test-time method on ``TEST_BATCHES`` batches."""
    seed_everything(0, verbose=False)
    method = tta_methods.method_from_yaml(name, **init_args)
    module = TransferModule(BACKBONE_FACTORIES[kind](), LinearProbe(), num_classes=5, test_time=method)
    trainer = _trainer(devices, inference_mode=False, limit_test_batches=TEST_BATCHES)
    trainer.test(module, datamodule=_digits(module, batch_size), verbose=False)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()
             if k.startswith("test_time.") or "norm" in k or ".bn" in k}
    return {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")},
            "state": state}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    results: dict[str, Any] = {"strategies": {}, "test_time": {}}
    for key in run_keys():
        checkpoints = Path(out_dir) / "checkpoints" if key == "lora" else None  # one run checks who writes them
        results["strategies"][key] = fit_strategy(*comparable_case(key), devices=2, batch_size=PER_RANK_BATCH,
                                                  checkpoint_dir=checkpoints)
    for i, (name, init_args, kind) in enumerate(TEST_TIME_CASES):
        results["test_time"][f"{i}-{name}-{kind}"] = test_time_run(name, init_args, kind, devices=2,
                                                                   batch_size=PER_RANK_BATCH)
    from tests.helpers.contract_runs import CONTRACT_KEYS, contract_run

    results["contracts"] = {key: contract_run(key, devices=2, batch_size=PER_RANK_BATCH) for key in CONTRACT_KEYS}
    rank = torch.distributed.get_rank()
    results["world_size"] = torch.distributed.get_world_size()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
