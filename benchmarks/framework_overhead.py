"""Framework overhead: TransferModule + Lightning Trainer against a plain PyTorch loop, same model and batches.

Both loops train copies of the same model on the same batches (same order), epoch by epoch, interleaved in one
process: each Lightning epoch has one plain epoch next to it (after it, then before it, alternately), so machine noise
hits both alike. The Lightning side is what the CLI runs (metrics, logging, the always-on EfficiencyMonitor); the
plain side is forward, loss, backward and step only. Prints samples/s of both and the median ratio over the epoch
pairs (target >= 0.95).

    python benchmarks/framework_overhead.py                 # quickstart-sized ViT and a ViT-S-shaped one
    python benchmarks/framework_overhead.py --epochs 6 --models quickstart
    python benchmarks/framework_overhead.py --threads 1 --epochs 16    # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer.backbones.timm import TimmBackbone
from lightning_transfer.callbacks.efficiency import EfficiencyMonitor
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import FullFinetune, LinearProbe

MODELS = {
    # name: (backbone kwargs, batch size, number of batches per epoch)
    "quickstart": ({"model_name": "test_vit", "model_kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1}}, 64, 90),
    "vit_s16_shaped": ({"model_name": "vit_small_patch16_224", "model_kwargs": {"img_size": 96}}, 16, 8),
}


def _loader(backbone: TimmBackbone, batch: int, batches: int) -> DataLoader:
    c, h, w = backbone.data_config()["input_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * batches, c, h, w, generator=g)
    y = torch.randint(0, 10, (batch * batches,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _plain_epoch(model: LightningModule, optimizer: torch.optim.Optimizer, loader: DataLoader) -> float:
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


class _Interleave(Callback):
    """Times each Lightning training epoch and one plain epoch on the copy next to it, alternating which goes first
    (plain after Lightning on even epochs, before it on odd ones), so a slowdown that hits whichever loop runs first
    or second (caches, frequency, a neighbour's burst) does not favour one side."""

    def __init__(self, plain: LightningModule, loader: DataLoader) -> None:
        # the same optimizer the Lightning side gets (for TransferModule: the strategy's parameter groups)
        self.plain, self.loader, self.optimizer = plain, loader, plain.configure_optimizers()
        self.lightning_s: list[float] = []
        self.plain_s: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch % 2:
            self.plain_s.append(_plain_epoch(self.plain, self.optimizer, self.loader))
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.lightning_s.append(time.perf_counter() - self._start)
        if trainer.current_epoch % 2 == 0:
            self.plain_s.append(_plain_epoch(self.plain, self.optimizer, self.loader))

    def ratios(self) -> list[float]:
        """Per epoch pair, Lightning's throughput over the plain loop's (epoch 0, the warm-up, left out)."""
        return [p / lt for lt, p in zip(self.lightning_s[1:], self.plain_s[1:])]


def measure(model: str, strategy_cls: type, epochs: int) -> tuple[float, float, list[float]]:
    """(Lightning samples/s, plain samples/s, per-epoch-pair throughput ratios), medians over the timed epochs."""
    spec, batch, batches = MODELS[model]
    torch.manual_seed(0)
    module = TransferModule(TimmBackbone(**spec), strategy_cls(), num_classes=10,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    plain = copy.deepcopy(module)
    loader = _loader(module.backbone, batch, batches)
    timer = _Interleave(plain, loader)
    trainer = Trainer(max_epochs=epochs + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[EfficiencyMonitor(), timer], accelerator="cpu",
                      log_every_n_steps=50)
    trainer.fit(module, train_dataloaders=loader)
    samples = batch * batches
    # epoch 0 warms up both (allocator, first saved-bytes measurement); the median of the rest is reported
    lightning = samples / statistics.median(timer.lightning_s[1:])
    plain_rate = samples / statistics.median(timer.plain_s[1:])
    return lightning, plain_rate, timer.ratios()


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


def lightning_floor(steps: int = 300, epochs: int = 3) -> tuple[float, float]:
    """Milliseconds per step of a bare LightningModule and of the same plain loop: Lightning's own per-step cost."""
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64 * steps, 8, generator=g), torch.randint(0, 10, (64 * steps,),
                                                                                             generator=g)),
                        batch_size=64)
    model, plain = _Bare(), _Bare()
    timer = _Interleave(plain, loader)
    trainer = Trainer(max_epochs=epochs + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer], accelerator="cpu", log_every_n_steps=50)
    trainer.fit(model, train_dataloaders=loader)
    return 1e3 * statistics.median(timer.lightning_s[1:]) / steps, 1e3 * statistics.median(timer.plain_s[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} timed epoch pairs each; "
          "ratio = median over the pairs of Lightning's throughput / the plain loop's, [quartiles]")
    print(f"{'model':<16} {'strategy':<14} {'lightning/s':>12} {'plain/s':>10} {'ratio':>7} {'[q1, q3]':>15} "
          f"{'ms/step added':>14}")
    for model in args.models.split(","):
        batch = MODELS[model][1]
        for strategy_cls in (FullFinetune, LinearProbe):
            lightning, plain, ratios = measure(model, strategy_cls, args.epochs)
            q1, ratio, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
            added = 1e3 * batch * (1 / lightning - 1 / plain)
            print(f"{model:<16} {strategy_cls.__name__:<14} {lightning:>12.1f} {plain:>10.1f} {ratio:>7.3f} "
                  f"{f'[{q1:.3f}, {q3:.3f}]':>15} {added:>14.2f}")
    bare, loop = lightning_floor()
    print(f"Lightning's own floor (a bare LightningModule, one linear layer, batch 64): {bare:.2f} ms/step against "
          f"{loop:.2f} ms/step in a plain loop, {bare - loop:.2f} ms/step added")


if __name__ == "__main__":
    main()
