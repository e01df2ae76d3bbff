"""Validation step time with TransferModule's metrics logged once per dataloader (now) against once per step (before).

Each ``self.log()`` of a value costs Lightning ~0.65 ms on a 2-core CPU (it moves the stored metric to the value's
device by walking it), and TransferModule used to make four a validation step (loss, accuracy, top-5, ECE). Both
variants run ``trainer.validate`` on the same module and batches, alternating, several rounds; the numbers they log
are the same (tests/test_module.py checks them against a direct pass).

    python benchmarks/eval_logging_cost.py
    python benchmarks/eval_logging_cost.py --rounds 8 --model vit_s16_shaped
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
from framework_overhead import MODELS, synthetic_loader
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_transfer.backbones.timm import TimmBackbone
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import LinearProbe

# validation batches of each model; the models and batch sizes are framework_overhead.py's
BATCHES = {"quickstart": 60, "vit_s16_shaped": 12}


def _log_every_step(module: TransferModule, batch, batch_idx, metrics, logits=None):
    """The evaluation step as it was: loss and metrics logged on every step."""
    if logits is None:
        logits = module(batch[0])
    loss = torch.nn.functional.cross_entropy(logits, batch[1])
    stage = "val" if metrics is module.val_metrics else "test"
    module.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(batch[0]), sync_dist=True)
    metrics.update(logits, batch[1])
    module.log_dict({k: v for k, v in metrics.items(keep_base=False, copy_state=False) if not k.endswith("/loss")},
                    on_step=False, on_epoch=True)
    return loss


def _validate_ms(module: TransferModule, loader: DataLoader, per_step: bool) -> tuple[float, dict[str, float]]:
    if per_step:
        module._eval_step = _log_every_step.__get__(module)  # type: ignore[method-assign]
    else:
        module.__dict__.pop("_eval_step", None)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    start = time.perf_counter()
    metrics = trainer.validate(module, loader, verbose=False)[0]
    return 1e3 * (time.perf_counter() - start) / len(loader), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BATCHES), default="quickstart")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    spec, batch, _ = MODELS[args.model]
    batches = BATCHES[args.model]
    torch.manual_seed(0)
    module = TransferModule(TimmBackbone(**spec), LinearProbe(), num_classes=10)
    loader = synthetic_loader(module.backbone, batch, batches)
    _validate_ms(module, loader, per_step=False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    logged: dict[bool, dict[str, float]] = {}
    for r in range(args.rounds):
        for per_step in ((True, False) if r % 2 else (False, True)):
            ms, logged[per_step] = _validate_ms(module, loader, per_step)
            times[per_step].append(ms)
    before, now = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.model}, LinearProbe, {batches} validation batches of {batch}, {args.rounds} rounds each, "
          f"{args.threads} threads")
    print(f"metrics logged every step (before):  {before:7.2f} ms per validation step")
    print(f"metrics logged once per dataloader:  {now:7.2f} ms per validation step")
    print(f"saved {before - now:.2f} ms a step; throughput ratio before/now {now / before:.3f}")
    same = all(abs(logged[True][k] - logged[False][k]) <= 1e-5 * max(1.0, abs(logged[True][k])) for k in logged[True])
    print(f"same logged numbers: {same} ({', '.join(f'{k}={v:.4f}' for k, v in sorted(logged[False].items()))})")


if __name__ == "__main__":
    main()
