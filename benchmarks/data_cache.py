"""Training-loader throughput of a VTAB-1k task with and without the in-memory uint8 cache, side by side in one run.

Writes a VTAB-1k-layout task to a temporary folder: ``--images`` JPEGs (default 1,000, as train800val200) of
500x375 pixels whose content is random but smooth, like a photograph (random fields at several scales plus fine
noise, quality 90, about 50 KB each), so decoding costs what it costs on real data. Then, for :class:`VTAB1k` in
the final mode (224x224 direct resize, ImageNet normalisation, batch 64, ``num_workers`` 0):

1. one epoch of the training loader decoding every JPEG (no cache);
2. building the cache (``setup`` with ``cache_images=True``: decode + resize every image of the train and test
   lists once), timed on its own;
3. one epoch of the training loader over the cache.

It prints images/s of each and the ratio of the two epochs (the target: at least 3x). Torch runs one thread by
default, as in each DataLoader worker process (several threads on tiny per-image tensor ops only add overhead).

    .venv/bin/python benchmarks/data_cache.py [--images 1000] [--size 224] [--batch 64] [--test-images 64] \
        [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_transfer.datamodules.files import UInt8Cache  # noqa: E402
from lightning_transfer.datamodules.vtab import VTAB1k  # noqa: E402

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic", "crop_pct": 0.9}


def smooth_image(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """Random fields at 3 scales (coarse ones strongest) + fine noise: photo-like spectra and JPEG sizes.

    The fields are summed at a quarter of the size and upsampled once (bicubic), which keeps writing 1,000 fast.
    """
    w, h = width // 4, height // 4
    canvas = np.zeros((h, w, 3), dtype=np.float32)
    for cells, amplitude in ((4, 90.0), (16, 45.0), (48, 20.0)):
        field = rng.normal(size=(max(2, cells * h // w), cells, 3)).astype(np.float32)
        upsampled = [np.asarray(Image.fromarray(field[..., c]).resize((w, h), Image.Resampling.BICUBIC))
                     for c in range(3)]  # mode "F": float fields, bicubic
        canvas += amplitude * np.stack(upsampled, axis=-1)
    small = Image.fromarray(np.clip(canvas + 128.0, 0, 255).astype(np.uint8))
    full = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    full = full + rng.normal(scale=6.0, size=full.shape).astype(np.float32)
    return Image.fromarray(np.clip(full, 0, 255).astype(np.uint8))


def write_task(root: Path, images: int, test_images: int, seed: int = 0) -> None:
    """A VTAB-1k task folder: images/<i>.jpg and the four ``path label`` lists (10 classes)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(images + test_images):
        smooth_image(rng).save(root / "images" / f"{i:05d}.jpg", quality=90)
        rows.append(f"images/{i:05d}.jpg {i % 10}")
    train = rows[:images]
    cut = images * 4 // 5
    for name, lines in (("train800val200", train), ("train800", train[:cut]), ("val200", train[cut:]),
                        ("test", rows[images:])):
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")


def epoch(datamodule: VTAB1k) -> tuple[float, int]:
    """Seconds and images of one pass over the training loader (batches are materialised, nothing else)."""
    start, seen = time.perf_counter(), 0
    for x, _ in datamodule.train_dataloader():
        seen += x.shape[0]
    return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="training images (train800val200)")
    parser.add_argument("--test-images", type=int, default=64, help="test images (also decoded into the cache)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is what each DataLoader worker process runs with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = {"input_size": (3, args.size, args.size), **IMAGENET}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vtab-1k" / "caltech101"
        start = time.perf_counter()
        write_task(root, args.images, args.test_images)
        size_kb = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1024 / (args.images + args.test_images)
        print(f"fixture: {args.images} + {args.test_images} JPEGs of 500x375 (mean {size_kb:.0f} KB) written in "
              f"{time.perf_counter() - start:.1f}s; {args.size}x{args.size}, batch {args.batch}, num_workers 0, "
              f"torch threads {torch.get_num_threads()}")

        plain = VTAB1k("caltech101", root=str(root), batch_size=args.batch, data_config=config)
        plain.setup()
        plain_s, n = epoch(plain)
        print(f"no cache  : epoch {plain_s:7.2f}s  {n / plain_s:8.1f} images/s  (decode, resize, normalise per image)")

        cached = VTAB1k("caltech101", root=str(root), batch_size=args.batch, data_config=config, cache_images=True)
        start = time.perf_counter()
        cached.setup()
        build_s = time.perf_counter() - start
        built = args.images + args.test_images
        caches = {id(d): d for d in cached.datasets.values() if isinstance(d, UInt8Cache)}  # val is test here
        megabytes = sum(d.images.numel() for d in caches.values()) / 2**20
        print(f"cache     : build {build_s:7.2f}s  {built / build_s:8.1f} images/s  "
              f"({built} images, {megabytes:.0f} MB uint8)")
        cached_s, n_cached = epoch(cached)
        print(f"cached    : epoch {cached_s:7.2f}s  {n_cached / cached_s:8.1f} images/s")
        assert n_cached == n
        same = torch.allclose(plain.datasets["train"][0][0], cached.datasets["train"][0][0], atol=1e-5)
        print(f"epoch speed-up with the cache: {plain_s / cached_s:.1f}x (target >= 3x); build + first epoch "
              f"{build_s + cached_s:.2f}s vs {plain_s:.2f}s; cached image equals decoded image: {same}")


if __name__ == "__main__":
    main()
