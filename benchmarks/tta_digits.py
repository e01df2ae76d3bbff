"""A second real shift: a digit classifier trained by the project on MNIST, tested on USPS with test-time adaptation.

The real MNIST *test* set (../shared/data/mnist, 10k) is split 80/20 per class: 8000 images train a CIFAR ResNet-20
from scratch with ``Trainer.fit`` (FullFinetune, AdamW), the other 2000 are the in-domain check. USPS (2007 test
images, 16x16) is the target; MNIST is resized 28 -> 16 so both share the input size. Then Source / BN-adapt /
Tent / CAFA (statistics from the MNIST training split) are run through ``trainer.test`` at batch 200, Adam 1e-3.

    python benchmarks/tta_digits.py
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from PIL import Image

from lightning_transfer.backbones.cifar_resnet import CIFARResNet
from lightning_transfer.datamodules.base import stratified_split
from lightning_transfer.datamodules.corruption import NpzImages
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.test_time.bn_adapt import BNAdapt
from lightning_transfer.test_time.cafa import CAFA
from lightning_transfer.test_time.tent import Tent

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SIZE = 16
DATA_CONFIG = {"input_size": (3, SIZE, SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)  # (N, H, W) -> (N, H, W, 3) uint8


def write_npz(data_dir: Path, out: Path, seed: int) -> None:
    """MNIST train / held-out and USPS test as (N, 16, 16, 3) uint8 npz files in ``out``."""
    images = np.frombuffer(gzip.open(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    mnist = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR))
                      for im in images.reshape(-1, 28, 28)])
    train, held = stratified_split(labels, 0.2, seed=seed)
    np.savez(out / "mnist_train.npz", x=_rgb(mnist[train]), y=labels[train])
    np.savez(out / "mnist_heldout.npz", x=_rgb(mnist[held]), y=labels[held])
    usps = np.loadtxt(data_dir / "usps" / "zip.test.gz")  # (2007, 257): label, 256 values in [-1, 1]
    x = np.uint8(np.round((usps[:, 1:].reshape(-1, SIZE, SIZE) + 1) / 2 * 255))  # black background, like MNIST
    np.savez(out / "usps_test.npz", x=_rgb(x), y=usps[:, 0].astype(np.uint8))


def datamodule(out: Path, test_file: str, batch_size: int) -> NpzImages:
    return NpzImages(data_dir=str(out), train_file="mnist_train.npz", test_file=test_file, val_fraction=0.0,
                     class_names=[str(i) for i in range(10)], batch_size=batch_size, data_config=DATA_CONFIG)


def _trainer(**kw) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.data_dir / "mnist").is_dir() or not (args.data_dir / "usps").is_dir():
        raise SystemExit(f"{args.data_dir} lacks mnist/ or usps/: pass --data-dir (the project's ../shared/data)")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed, verbose=False)
    out = Path(tempfile.mkdtemp(prefix="tta_digits_"))
    write_npz(args.data_dir, out, args.seed)

    start = time.perf_counter()
    model = TransferModule(CIFARResNet(depth=20), FullFinetune(), num_classes=10,
                           optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4))
    train_data = NpzImages(data_dir=str(out), train_file="mnist_train.npz", test_file="mnist_heldout.npz",
                           val_fraction=0.0, class_names=[str(i) for i in range(10)], batch_size=128,
                           data_config=DATA_CONFIG)
    _trainer(max_epochs=args.epochs, limit_val_batches=0).fit(model, datamodule=train_data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_train = len(train_data.datasets["train"])
    print(f"trained ResNet-20 on {n_train} MNIST images for {args.epochs} epochs in {time.perf_counter() - start:.0f}s")

    methods = {"Source": None, "BN-adapt": BNAdapt(), "Tent": Tent(lr=1e-3), "CAFA": CAFA(lr=1e-3)}
    rows = []
    for name, test_time in methods.items():
        accuracies = []
        for test_file in ("mnist_heldout.npz", "usps_test.npz"):
            module = TransferModule(CIFARResNet(depth=20), FullFinetune(), num_classes=10)
            module.load_state_dict(state)
            if test_time is not None:  # a fresh method per test set: each starts from the trained model
                module.test_time = type(test_time)(**test_time.init_config()["init_args"])
            result = _trainer(inference_mode=False).test(module, datamodule=datamodule(out, test_file,
                                                                                        args.batch_size), verbose=False)
            accuracies.append(100 * result[0]["test/acc"])
        rows.append((name, *accuracies))
        print(f"{name}: MNIST {accuracies[0]:.1f}%, USPS {accuracies[1]:.1f}%")

    print(f"\nMNIST -> USPS, ResNet-20 trained by the project on {n_train} MNIST images ({SIZE}x{SIZE}); accuracy %, "
          f"batch {args.batch_size}, Adam lr 1e-3, 1 step, online; CAFA statistics from the MNIST training split\n")
    print("| method | MNIST held-out (2000) | USPS test (2007) |")
    print("|---|---|---|")
    for name, mnist, usps in rows:
        print(f"| {name} | {mnist:.1f} | {usps:.1f} |")


if __name__ == "__main__":
    main()
