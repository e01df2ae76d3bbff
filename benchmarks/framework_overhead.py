"""Training-step time of this tree against a baseline revision of the package, measured side by side in one run.

Each measurement is a fresh process that fits ``TransferModule`` on in-memory synthetic images with a plain
``Trainer`` (no logger, no checkpointing, no progress bar) and records the wall time between consecutive
``on_train_batch_start`` calls: the whole step as a user pays it (data fetch, forward, backward, optimizer and every
framework hook). The baseline is the package at ``--baseline`` (a git revision, exported with ``git archive`` to a
temporary directory and put first on ``PYTHONPATH``); the two sides alternate round by round so drifting machine
load hits both alike, and the table gives the median step of each side and the ratio after / before.

    python benchmarks/framework_overhead.py                       # quickstart, ViT-S/16 and ResNet-50 at 224
    python benchmarks/framework_overhead.py --models quickstart --rounds 5

The default baseline is the last revision before the core rewrite (it had the direct optimization step, the
profiler swap and the ``__setattr__`` fast path); this tree has none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "7741fa8"
MODELS = {
    # name: (timm model, model kwargs, batch size, strategy)
    "quickstart": ("test_vit", {"img_size": 8, "patch_size": 2, "in_chans": 1}, 64, "LinearProbe"),
    "quickstart_full": ("test_vit", {"img_size": 8, "patch_size": 2, "in_chans": 1}, 64, "FullFinetune"),
    "vit_s16_224": ("vit_small_patch16_224", {}, 32, "FullFinetune"),
    "resnet50_224": ("resnet50", {}, 32, "FullFinetune"),
}
DEFAULT_MODELS = "quickstart,quickstart_full,vit_s16_224,resnet50_224"


def worker(model: str, steps: int, warmup: int, threads: int) -> None:
    """One fit in this process; prints {"package": where it was imported from, "steps_ms": [...]} as JSON."""
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_transfer
    from lightning_transfer.backbones.timm import TimmBackbone
    from lightning_transfer.module import TransferModule
    from lightning_transfer.strategies import FullFinetune, LinearProbe

    torch.set_num_threads(threads)
    name, kwargs, batch, strategy = MODELS[model]
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name=name, model_kwargs=kwargs)
    module = TransferModule(backbone, {"FullFinetune": FullFinetune, "LinearProbe": LinearProbe}[strategy](),
                            num_classes=10, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    c, h, w = backbone.data_config()["input_size"]
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + warmup + 1)
    data = TensorDataset(torch.randn(n, c, h, w, generator=g), torch.randint(0, 10, (n,), generator=g))
    starts: list[float] = []

    class StepClock(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            starts.append(time.perf_counter())

    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup + 1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=[StepClock()])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=batch))
    periods = [1000 * (b - a) for a, b in zip(starts, starts[1:])][warmup:]
    print(json.dumps({"package": str(Path(lightning_transfer.__file__).parent.parent), "steps_ms": periods}))


def export_baseline(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, "lightning_transfer"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_side(root: Path, model: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", model, "--steps",
                           str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)],
                          cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{model} under {root} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["package"]).resolve() != root.resolve():
        raise SystemExit(f"expected the package from {root}, the worker imported {result['package']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="before/after pairs per model")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default: 60 tiny, 4 real)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.threads)
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    print(f"baseline {args.baseline} vs this tree; {args.rounds} alternating rounds, {args.threads} threads, CPU")
    print(f"{'model':<16}{'strategy':<14}{'batch':>6}{'before ms':>11}{'after ms':>11}{'after/before':>14}"
          f"{'per-round ratios':>24}")
    with tempfile.TemporaryDirectory() as tmp:
        before_root = export_baseline(args.baseline, Path(tmp))
        for model in models:
            steps = args.steps or (60 if model.startswith("quickstart") else 4)
            side_args = argparse.Namespace(**{**vars(args), "steps": steps})
            before, after, ratios = [], [], []
            for r in range(args.rounds):  # alternate which side goes first
                order = [(before_root, before), (REPO, after)]
                for root, into in (order if r % 2 == 0 else order[::-1]):
                    into.append(statistics.median(run_side(root, model, side_args)["steps_ms"]))
                ratios.append(after[-1] / before[-1])
            b, a = statistics.median(before), statistics.median(after)
            _, _, batch, strategy = MODELS[model]
            print(f"{model:<16}{strategy:<14}{batch:>6}{b:>11.1f}{a:>11.1f}{a / b:>14.3f}"
                  f"{' '.join(f'{x:.3f}' for x in ratios):>24}", flush=True)


if __name__ == "__main__":
    main()
