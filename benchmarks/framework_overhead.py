"""Framework overhead: TransferModule + Lightning Trainer against a plain PyTorch loop, same model and batches.

Both loops train the same model object with the same optimizer on the same batches (same order), in one process,
step by step: after every Lightning training step, one plain step runs. The Lightning side is TransferModule (metrics,
logging) in a Trainer with the EfficiencyMonitor every CLI run has; ``--cli-defaults`` adds what the CLI's
``configs/defaults.yaml`` adds per step (progress bar, ModelCheckpoint, a logger). The plain side is fetch, forward,
loss, backward and step only.
Prints each side's median step time and the median and quartiles of the per-pair throughput ratios (target >= 0.95),
and the same bare-LightningModule comparison, which is Lightning's own per-step cost.

    python benchmarks/framework_overhead.py                 # quickstart-sized ViT and a ViT-S-shaped one
    python benchmarks/framework_overhead.py --epochs 6 --models quickstart
    python benchmarks/framework_overhead.py --threads 1 --epochs 8     # one thread each
    python benchmarks/framework_overhead.py --accelerator gpu          # on a GPU (device synchronised per step)
    python benchmarks/framework_overhead.py --cli-defaults --models quickstart
    python benchmarks/framework_overhead.py --accelerator gpu --pairing epoch --epochs 8   # no per-step sync
    LIGHTNING_TRANSFER_DIRECT_STEP=0 python benchmarks/framework_overhead.py --models quickstart
    python benchmarks/framework_overhead.py --models quickstart --ab    # direct step against Lightning's, one fit

TransferModule runs each optimization step through ``lightning_transfer.direct_step`` (Lightning's automatic
optimization, same hooks and effects, fewer layers); ``LIGHTNING_TRANSFER_DIRECT_STEP=0`` keeps Lightning's own loop,
to measure what that saves; ``--ab`` alternates the two step by step within each fit, the steadier comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import direct_step
from lightning_transfer.backbones.timm import TimmBackbone
from lightning_transfer.callbacks import EfficiencyMonitor, ThrottledProgressBar
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import FullFinetune, LinearProbe

MODELS = {
    # name: (backbone kwargs, batch size, number of batches per epoch)
    "quickstart": ({"model_name": "test_vit", "model_kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1}}, 64, 90),
    "vit_s16_shaped": ({"model_name": "vit_small_patch16_224", "model_kwargs": {"img_size": 96}}, 16, 8),
    # ViT-S/16 as trained on a GPU (224x224, batch 64); minutes per epoch on a CPU, so not in the default set
    "vit_s16_224": ({"model_name": "vit_small_patch16_224"}, 64, 12),
}
DEFAULT_MODELS = "quickstart,vit_s16_shaped"


def synthetic_loader(backbone: TimmBackbone, batch: int, batches: int) -> DataLoader:
    """``batches`` batches of seeded random images of the backbone's input size and labels 0-9, in a fixed order."""
    c, h, w = backbone.data_config()["input_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * batches, c, h, w, generator=g)
    y = torch.randint(0, 10, (batch * batches,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


class _Interleave(Callback):
    """After every Lightning training step, one plain step of the very same module and optimizer: the next batch of
    its own pass over the same loader (fetch included), zero_grad, forward, loss, backward, step.

    Lightning's step k is the time from one ``on_train_batch_start`` to the next (its fetch, hooks, closure, logging)
    less the plain step k that ran inside that interval, so each pair of steps runs within a few milliseconds of each
    other: a neighbour's burst or a frequency change hits both sides of a pair alike, which whole-epoch interleaving
    could not achieve on a shared machine. One module, not a copy: two copies of one model can differ by 5-10% in
    speed on a CPU (where their weights and optimizer state landed in memory), a bias as large as the effect measured.
    Epoch 0 warms up and is left out; so is each epoch's last step (its interval runs into the epoch-end hooks)."""

    def __init__(self, loader: DataLoader, device: torch.device | None = None) -> None:
        self.loader = loader
        # on a GPU each side's time ends at a synchronisation, so kernels one side queued are not billed to the other
        self.device = device if device is not None and device.type == "cuda" else None
        self.lightning_steps: list[float] = []
        self.plain_steps: list[float] = []
        self._last: float | None = None
        self._plain = 0.0  # seconds of the plain step run inside the current Lightning interval

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batches = iter(self.loader)
        self._last = None

    def _sync(self) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch:
            self.lightning_steps.append(now - self._last - self._plain)
            self.plain_steps.append(self._plain)
        self._last = now

    def _plain_step(self, module: LightningModule, optimizer: torch.optim.Optimizer, batch: list) -> None:
        """What a plain loop does for one batch; its tensors are freed before it returns, as the next one would."""
        x, y = batch
        if self.device is not None:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        optimizer.step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        start = time.perf_counter()
        self._plain_step(pl_module, trainer.optimizers[0], next(self._batches))
        self._sync()
        self._plain = time.perf_counter() - start


class _InterleaveEpochs(_Interleave):
    """Whole epochs instead of steps: after each Lightning epoch, one plain epoch over the same loader.

    Nothing synchronises inside an epoch, so on a GPU each side can queue work ahead as a real run does (a
    per-step synchronisation bills the loop's host time in full, where a run would overlap it with the GPU's work);
    for a quiet dedicated machine, where epoch-to-epoch noise is small. Epoch 0 warms up and is left out."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync()
        lightning = time.perf_counter() - self._start
        start = time.perf_counter()
        for batch in self.loader:
            self._plain_step(pl_module, trainer.optimizers[0], batch)
        self._sync()
        if trainer.current_epoch:
            self.lightning_steps.append(lightning)
            self.plain_steps.append(time.perf_counter() - start)


class _AlternateLoops(_Interleave):
    """For ``--ab``: Lightning's steps alternate between TransferModule's direct optimization step (even global steps)
    and Lightning's own automatic optimization (odd ones), in one fit, each paired with its plain step as usual. The
    two loop objects share one progress counter, so the fit counts its steps as either would."""

    def __init__(self, loader: DataLoader, device: torch.device | None = None) -> None:
        super().__init__(loader, device)
        self.kinds: list[str] = []  # the loop each recorded pair's Lightning step ran through
        self._kind = ""
        self._loops: dict[str, _AutomaticOptimization] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        recorded = len(self.lightning_steps)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if len(self.lightning_steps) > recorded:
            self.kinds.append(self._kind)
        epoch_loop = trainer.fit_loop.epoch_loop
        if not self._loops:
            direct = epoch_loop.automatic_optimization
            if not isinstance(direct, direct_step.DirectOptimization):
                raise RuntimeError(f"--ab: the fit's step is {type(direct).__name__}, not the direct one "
                                   f"(is {direct_step.ENV_SWITCH}=0 set?)")
            lightning = _AutomaticOptimization(trainer)
            lightning.optim_progress = direct.optim_progress
            self._loops = {"direct": direct, "lightning": lightning}
        self._kind = "direct" if trainer.global_step % 2 == 0 else "lightning"
        epoch_loop.automatic_optimization = self._loops[self._kind]


def _cuda_if(accelerator: str) -> torch.device | None:
    return torch.device("cuda") if accelerator == "gpu" else None


def measure(model: str, strategy_cls: type, epochs: int, accelerator: str = "cpu",
            cli_defaults: bool = False, pairing: str = "step", ab: bool = False) -> dict[str, Any]:
    """Median step milliseconds of both sides and the median and quartiles of the per-pair ratios (see _summary);
    with ``ab``, one such summary for each loop ({"direct": ..., "lightning": ...}).

    ``cli_defaults`` adds what a ``fit`` with ``configs/defaults.yaml`` also runs every step: the CLI's progress bar,
    a ModelCheckpoint callback and a logger written every 5 steps (a CSV logger here, where the CLI has W&B)."""
    spec, batch, batches = MODELS[model]
    torch.manual_seed(0)
    module = TransferModule(TimmBackbone(**spec), strategy_cls(), num_classes=10,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    loader = synthetic_loader(module.backbone, batch, batches)
    timer = (_AlternateLoops if ab else _Interleave if pairing == "step" else _InterleaveEpochs)(
        loader, _cuda_if(accelerator))
    # the progress bar writes to stdout: to the null device here, so the table stays readable
    with tempfile.TemporaryDirectory() as out, open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        extra: dict = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                       "log_every_n_steps": 50, "callbacks": [EfficiencyMonitor(), timer]}
        if cli_defaults:
            extra = {"logger": CSVLogger(out), "log_every_n_steps": 5, "default_root_dir": out,
                     "callbacks": [EfficiencyMonitor(), ThrottledProgressBar(),
                                   ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0), timer]}
        trainer = Trainer(max_epochs=epochs + 1, enable_model_summary=False, accelerator=accelerator, devices=1,
                          **extra)
        trainer.fit(module, train_dataloaders=loader)
    if isinstance(timer, _AlternateLoops):  # one summary per loop, over its own steps
        return {kind: _summary([lt for lt, k in zip(timer.lightning_steps, timer.kinds) if k == kind],
                               [p for p, k in zip(timer.plain_steps, timer.kinds) if k == kind])
                for kind in ("direct", "lightning")}
    return _summary(timer.lightning_steps, timer.plain_steps)


def _summary(lightning_steps: list[float], plain_steps: list[float]) -> dict[str, float]:
    ratios = [p / lt for lt, p in zip(lightning_steps, plain_steps)]
    q1, ratio, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3  # one pair: no spread
    added = [lt - p for lt, p in zip(lightning_steps, plain_steps)]
    return {"lightning_ms": 1e3 * statistics.median(lightning_steps),
            "plain_ms": 1e3 * statistics.median(plain_steps), "ratio": ratio, "q1": q1, "q3": q3,
            "total_ratio": sum(plain_steps) / sum(lightning_steps),
            "added_ms": 1e3 * statistics.median(added), "pairs": len(ratios)}


class _Bare(LightningModule):
    """The least a LightningModule can be: one linear layer, a loss, an optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def lightning_floor(steps: int = 300, epochs: int = 3, accelerator: str = "cpu") -> dict[str, float]:
    """A bare LightningModule against the same plain loop (median step ms of each): Lightning's own per-step cost."""
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64 * steps, 8, generator=g), torch.randint(0, 10, (64 * steps,),
                                                                                             generator=g)),
                        batch_size=64)
    model = _Bare()
    timer = _Interleave(loader, _cuda_if(accelerator))
    trainer = Trainer(max_epochs=epochs + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer], accelerator=accelerator, devices=1,
                      log_every_n_steps=50)
    trainer.fit(model, train_dataloaders=loader)
    return _summary(timer.lightning_steps, timer.plain_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--strategies", default="FullFinetune,LinearProbe",
                        help="comma-separated, of: FullFinetune, LinearProbe")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--pairing", default="step", choices=["step", "epoch"],
                        help="pair single steps (default) or whole epochs; the times printed are then per epoch")
    parser.add_argument("--cli-defaults", action="store_true",
                        help="add the CLI's per-step extras: progress bar, ModelCheckpoint, a logger every 5 steps")
    parser.add_argument("--ab", action="store_true",
                        help="alternate TransferModule's direct optimization step and Lightning's own loop step by "
                             "step in each fit, and print each one's ratio: what the direct step saves")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.ab and (args.pairing != "step" or not direct_step.enabled()):
        parser.error(f"--ab pairs single steps with the direct step on: drop --pairing epoch and "
                     f"{direct_step.ENV_SWITCH}=0")
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: at least 1 timed epoch is needed (epoch 0 only warms up)")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    strategies = {cls.__name__: cls for cls in (FullFinetune, LinearProbe)}
    unknown = set(args.strategies.split(",")) - set(strategies)
    if unknown:
        parser.error(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(strategies)}")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{torch.get_num_threads()} threads"
    unit = args.pairing
    step = ("direct (lightning_transfer.direct_step)" if direct_step.enabled()
            else f"Lightning's automatic optimization ({direct_step.ENV_SWITCH}=0)")
    print(f"torch {torch.__version__}, {where}, {args.epochs} timed epochs each; every "
          f"Lightning {unit} is paired with a plain {unit} of the same module run right after it"
          f"{'' if unit == 'step' else ' (ms columns are per epoch)'}.\n"
          f"ratio = median over the pairs of plain {unit} time / Lightning {unit} time (Lightning's throughput as a "
          "fraction of the plain loop's; target >= 0.95), [quartiles]; total = summed plain time / summed Lightning "
          "time; added = median per-pair difference.\n"
          f"TransferModule's optimization step: {step}", flush=True)
    width = 24 if args.ab else 14
    print(f"{'model':<16} {'strategy':<{width}} {'pairs':>5} {'Lightning ms':>12} {'plain ms':>9} {'ratio':>6} "
          f"{'[q1, q3]':>15} {'total':>6} {'ms added':>9}")
    for model in args.models.split(","):
        for strategy_cls in (strategies[name] for name in args.strategies.split(",")):
            results = measure(model, strategy_cls, args.epochs, args.accelerator, args.cli_defaults, args.pairing,
                              args.ab)
            for label, r in (results.items() if args.ab else [("", results)]):
                quartiles = f"[{r['q1']:.3f}, {r['q3']:.3f}]"
                name = f"{strategy_cls.__name__} {label}".strip()
                print(f"{model:<16} {name:<{width}} {r['pairs']:>5} {r['lightning_ms']:>12.2f} "
                      f"{r['plain_ms']:>9.2f} {r['ratio']:>6.3f} {quartiles:>15} {r['total_ratio']:>6.3f} "
                      f"{r['added_ms']:>9.2f}", flush=True)
    floor = lightning_floor(accelerator=args.accelerator)
    print(f"Lightning's own floor (a bare LightningModule, one linear layer, batch 64): {floor['lightning_ms']:.2f} "
          f"ms/step against {floor['plain_ms']:.2f} ms/step in a plain loop, {floor['added_ms']:.2f} ms/step added")


if __name__ == "__main__":
    main()
