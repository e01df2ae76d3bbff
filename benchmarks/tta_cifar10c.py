"""Test-time adaptation on CIFAR-10-C: the original ResNet-20 under the 15 corruptions, Source / BN-adapt / Tent / CAFA.

Protocol (Tent's ``cifar10c.py``, on the 1000-image subset in ../shared/data): ResNet-20 trained on CIFAR-10
(``resnet20-12fca82f``), ``cifar10_test1000`` corrupted on the fly at one severity, batch 200, Adam lr 1e-3,
one step per batch, online within a corruption and reset between corruptions (one test dataloader each, through
``trainer.test`` and the ``model.test_time`` slot). CAFA's class statistics come from ``cifar10_train1000``.
The cost column times one batch of adaptation against plain inference on the same batch, in this run.

    python benchmarks/tta_cifar10c.py                     # the README table (severity 5)
    python benchmarks/tta_cifar10c.py --corruptions fog contrast --severity 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lightning_transfer.backbones.cifar_resnet import CIFARResNet20
from lightning_transfer.datamodules.corruption import CORRUPTIONS, NpzImages
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.linear_probe import LinearProbe
from lightning_transfer.test_time.bn_adapt import BNAdapt
from lightning_transfer.test_time.cafa import CAFA
from lightning_transfer.test_time.tent import Tent

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
         "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
         "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast", "pixelate": "pixel",
         "jpeg_compression": "jpeg"}


def build_model(data_dir: Path, test_time) -> TransferModule:
    """The original ResNet-20 (its own classifier as the head) with a test-time method in the slot."""
    backbone = CIFARResNet20(checkpoint_path=str(data_dir / "resnet_cifar10" / "resnet20_state_dict.npz"))
    module = TransferModule(backbone, LinearProbe(), num_classes=10, test_time=test_time)
    module.head.fc.load_state_dict(backbone.linear.state_dict())  # type: ignore[union-attr]
    return module


def methods(args: argparse.Namespace) -> dict[str, object]:
    opt = {"lr": args.lr, "optimizer": "adam"}
    return {
        "Source": None,
        "BN-adapt": BNAdapt(),
        "Tent": Tent(**opt),
        "CAFA": CAFA(covariance=args.covariance, ridge=args.ridge, **opt),
    }


def errors_per_corruption(module: TransferModule, data: NpzImages) -> list[float]:
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, inference_mode=False)
    results = trainer.test(module, datamodule=data, verbose=False)
    keys = ["test/acc"] if len(results) == 1 else [f"test/acc/dataloader_idx_{i}" for i in range(len(results))]
    return [100.0 * (1.0 - r[k]) for r, k in zip(results, keys)]


def cost_per_batch(args: argparse.Namespace, data: NpzImages) -> dict[str, float]:
    """Median seconds per batch of each method, timed round-robin (interleaved) so load changes hit all alike.

    Source is plain no-grad inference; the others run ``adapt`` (forward, and backward + step where they train).
    """
    loader = data.test_dataloader()
    x, y = next(iter(loader[0] if isinstance(loader, list) else loader))
    models = {}
    for name, test_time in methods(args).items():
        module = build_model(args.data_dir, test_time).eval()
        if test_time is not None:
            test_time.prepare(module, data)
        models[name] = (module, test_time)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.repeats + 1):
        for name, (module, test_time) in models.items():
            start = time.perf_counter()
            if test_time is None:
                with torch.no_grad():
                    module(x)
            else:
                with torch.enable_grad():
                    test_time.adapt(module, (x, y))
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--covariance", choices=["class", "tied"], default="class")
    parser.add_argument("--ridge", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per method for the cost column")
    parser.add_argument("--cost-only", action="store_true", help="only the cost column (no error table)")
    parser.add_argument("--out", type=Path, default=Path("tta_cifar10c.json"))
    args = parser.parse_args()
    if not (args.data_dir / "resnet_cifar10").is_dir():
        raise SystemExit(f"{args.data_dir} lacks resnet_cifar10/: pass --data-dir (the project's ../shared/data)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    data = NpzImages(data_dir=str(args.data_dir), corruptions=args.corruptions, severities=[args.severity],
                     batch_size=args.batch_size, val_fraction=0.0)
    data.set_data_config(CIFARResNet20().data_config())
    data.setup("test")
    print(f"corrupted {len(args.corruptions)} x {len(data.test_sets[0])} images in {time.perf_counter() - start:.0f}s")

    table: dict[str, list[float]] = {}
    for name, test_time in ({} if args.cost_only else methods(args)).items():
        t0 = time.perf_counter()
        table[name] = errors_per_corruption(build_model(args.data_dir, test_time), data)
        print(f"{name}: mean error {statistics.mean(table[name]):.1f}% ({time.perf_counter() - t0:.0f}s)")
    cost = cost_per_batch(args, data)
    print("\ntime per batch of", args.batch_size, "relative to plain inference (median of", args.repeats,
          "interleaved rounds): " + ", ".join(f"{n} {cost[n] / cost['Source']:.2f}x" for n in cost))
    if args.cost_only:
        print(f"plain inference: {1000 * cost['Source']:.0f} ms per batch ({args.threads} CPU thread(s))")
        return

    names = list(table)
    print(f"\nResNet-20 (CIFAR-10), cifar10_test1000 under CIFAR-10-C severity {args.severity}: error % "
          f"(batch {args.batch_size}, Adam lr {args.lr}, 1 step, online, reset per corruption; "
          f"CAFA: {args.covariance} covariance, ridge {args.ridge}, statistics from cifar10_train1000)\n")
    print("| method | " + " | ".join(SHORT.get(c, c) for c in args.corruptions) + " | mean | time/batch vs inference |")
    print("|---|" + "---|" * (len(args.corruptions) + 2))
    for name in names:
        cells = " | ".join(f"{e:.1f}" for e in table[name])
        print(f"| {name} | {cells} | **{statistics.mean(table[name]):.1f}** | {cost[name] / cost['Source']:.2f}x |")
    print(f"\nplain inference: {1000 * cost['Source']:.0f} ms per batch of {args.batch_size} "
          f"({args.threads} CPU thread{'s' if args.threads > 1 else ''})")
    record = {
        "protocol": {"model": "resnet20-12fca82f (CIFAR-10)", "data": "cifar10_test1000", "severity": args.severity,
                     "corruptions": args.corruptions, "batch_size": args.batch_size, "optimizer": "adam",
                     "lr": args.lr, "steps": 1, "mode": "online, reset per corruption",
                     "cafa": {"covariance": args.covariance, "ridge": args.ridge, "source": "cifar10_train1000"},
                     "corruption_seed": 0},
        "error_percent": {n: dict(zip(args.corruptions, table[n])) | {"mean": statistics.mean(table[n])}
                          for n in names},
        "seconds_per_batch": cost,
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
