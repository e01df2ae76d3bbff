"""CIFAR-10-C corruptions (Hendrycks and Dietterich, ICLR 2019, arXiv 1903.12261) applied on the fly, and loaders.

The 15 benchmark corruptions at severities 1-5, written from the published definitions (``make_cifar_c.py``) with
its CIFAR parameters, using numpy/scipy/PIL instead of OpenCV, scikit-image and ImageMagick. Every function maps
an (H, W, 3) float image in [0, 1] to one in [0, 1]; :func:`corrupt` takes and returns uint8 like the released
files. Randomness comes from a ``numpy.random.Generator``; :func:`corrupt` seeds it from (seed, corruption,
severity, image bytes), so a corrupted image never depends on loading order or workers.

Two departures from the released data, both forced by missing dependencies: ``frost`` blends a procedural ice
texture (the original crops photographs of frost that are not distributed with this package), and ``motion_blur`` /
``snow`` use a Gaussian-weighted line kernel in place of ImageMagick's ``motion_blur``.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor
from torch.utils.data import Dataset

from lightning_transfer.datamodules.base import TransferDataModule, fewshot_indices, stratified_split
from lightning_transfer.datamodules.transforms import image_channels
from lightning_transfer.registry import register_datamodule

Rng = np.random.Generator
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0)


def gaussian_noise(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return _clip(x + rng.normal(size=x.shape, scale=c))


def shot_noise(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    c = [500, 250, 100, 75, 50][severity - 1]
    return _clip(rng.poisson(x * c) / c)


def impulse_noise(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    # salt-and-pepper on a fraction c of the values (per channel, as skimage's random_noise), half salt
    flip = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(flip, salt.astype(x.dtype), x)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    span = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(span, span)
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    kernel /= kernel.sum()
    ksize = 3 if radius <= 8 else 5
    g = np.exp(-((np.arange(ksize) - ksize // 2) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    return ndimage.convolve(kernel, np.outer(g, g), mode="mirror")  # OpenCV's GaussianBlur (reflect-101 border)


def defocus_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    kernel = _disk(*c)
    out = np.stack([ndimage.correlate(x[..., ch], kernel, mode="mirror") for ch in range(3)], -1)
    return _clip(out)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian on an (H, W, C) image: per channel, 'nearest' border, truncate 4."""
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def glass_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    img = (_gaussian(x, sigma) * 255).astype(np.uint8)  # the original quantises between the two blurs
    h, w = img.shape[:2]
    pixels = img.reshape(h * w, -1).tolist()  # python lists: the sequential swaps below are ~50x faster than numpy
    positions = [(r, c) for r in range(h - delta, delta, -1) for c in range(w - delta, delta, -1)]
    # integers in [-delta, delta): the published code's numpy randint (high exclusive), kept as is
    offsets: list[list[list[int]]] = rng.integers(-delta, delta, size=(iterations, len(positions), 2)).tolist()
    for it in range(iterations):
        for (row, col), (dx, dy) in zip(positions, offsets[it]):
            a, b = row * w + col, (row + dy) * w + col + dx
            pixels[a], pixels[b] = pixels[b], pixels[a]
    img = np.array(pixels, dtype=np.uint8).reshape(img.shape)
    return _clip(_gaussian(img / 255.0, sigma))


def _motion_kernel_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Blur along a line at ``angle`` degrees: sum_i w_i shift(x, i * direction), Gaussian weights, edge padding."""
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    dy, dx = np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))
    h, w = x.shape[:2]
    pad = width
    padded = np.pad(x, ((pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    out = np.zeros_like(x)
    for i, weight in enumerate(weights):
        oy, ox = int(np.ceil(i * dy - 0.5)), int(np.ceil(i * dx - 0.5))
        if abs(oy) >= h or abs(ox) >= w:
            break
        out += weight * padded[pad - oy: pad - oy + h, pad - ox: pad - ox + w]
    return out


def motion_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    radius, sigma = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][severity - 1]
    return _clip(_motion_kernel_blur(x, radius, sigma, rng.uniform(-45, 45)))


def _clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom about the centre, cropped back to (H, W); height and width separately (the original assumes squares)."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom)), int(np.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = ndimage.zoom(img[top:top + ch, left:left + cw], (zoom, zoom) + (1,) * (img.ndim - 2), order=1)
    trim_top, trim_left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[trim_top:trim_top + h, trim_left:trim_left + w]


def zoom_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    stop = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    zooms = np.arange(1, stop, 0.01)
    out = np.zeros_like(x)
    for z in zooms:
        out += _clipped_zoom(x, z)
    return _clip((x + out) / (len(zooms) + 1))


# ITU-R 601 luma: the weights of OpenCV's RGB2GRAY and PIL's "L"; every colour -> gray conversion here uses them
LUMA = (0.299, 0.587, 0.114)


def _gray(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]  # (H, W)


def snow(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][severity - 1]
    layer = rng.normal(size=x.shape[:2], loc=loc, scale=scale)
    layer = _clipped_zoom(layer[..., None], zoom)[..., 0]
    layer[layer < threshold] = 0
    layer = (_clip(layer) * 255).astype(np.uint8) / 255.0  # the original passes the flakes through an 8-bit image
    layer = _motion_kernel_blur(layer, radius, sigma, rng.uniform(-135, -45))[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, _gray(x)[..., None] * 1.5 + 0.5)
    return _clip(x + layer + np.rot90(layer, k=2))


def _plasma_fractal(size: int, decay: float, rng: Rng) -> np.ndarray:
    """Diamond-square fractal noise in [0, 1], (size, size); ``size`` a power of two (as the original)."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = wibbled_mean(square)
        dr, ul = grid[half:size:step, half:size:step], grid[0:size:step, 0:size:step]
        grid[0:size:step, half:size:step] = wibbled_mean(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))
        grid[half:size:step, 0:size:step] = wibbled_mean(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def fog(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    strength, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    h, w = x.shape[:2]
    size = 1 << int(np.ceil(np.log2(max(h, w, 2))))  # 32 for CIFAR, as the original
    max_val = x.max()
    x = x + strength * _plasma_fractal(size, decay, rng)[:h, :w, None]
    return _clip(x * max_val / (max_val + strength))


def _frost_texture(h: int, w: int, rng: Rng) -> np.ndarray:
    """Procedural frost: bright, bluish ice streaks over fractal haze (the original uses frost photographs)."""
    haze = _plasma_fractal(1 << int(np.ceil(np.log2(max(h, w, 2)))), 2.0, rng)[:h, :w]
    streaks = np.zeros((h, w))
    for _ in range(max(4, h * w // 64)):  # short random crystal segments
        r0, c0 = rng.uniform(0, h), rng.uniform(0, w)
        angle, length = rng.uniform(0, np.pi), rng.uniform(2, max(h, w) / 3)
        t = np.linspace(0, length, int(length * 2) + 1)
        rows = np.clip((r0 + t * np.sin(angle)).astype(int), 0, h - 1)
        cols = np.clip((c0 + t * np.cos(angle)).astype(int), 0, w - 1)
        streaks[rows, cols] = 1.0
    ice = _clip(0.55 * haze + 0.6 * ndimage.gaussian_filter(streaks, 0.6))
    return ice[..., None] * np.array([0.83, 0.89, 1.0])  # (H, W, 3), frost photographs are blue-white


def frost(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    keep, amount = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    h, w = x.shape[:2]
    return _clip(keep * x + amount * _frost_texture(h, w, rng))


def brightness(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _clip(hsv_to_rgb(hsv))


def contrast(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return _clip((x - means) * c + means)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix A with A @ [x, y, 1] = dst for three point pairs (OpenCV's getAffineTransform)."""
    return np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T


def elastic_transform(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    size = min(x.shape[:2])  # the CIFAR parameters are fractions of the 32-pixel image size
    alpha, sigma, affine = (size * np.array(v) for v in zip(*[
        (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]))
    alpha, sigma, affine = alpha[severity - 1], sigma[severity - 1], affine[severity - 1]
    h, w = x.shape[:2]
    centre, square = np.array([h, w], dtype=np.float32) // 2, min(h, w) // 3
    src = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square], dtype=np.float64)
    dst = src + rng.uniform(-affine, affine, size=src.shape)
    inverse = np.linalg.inv(np.vstack([_affine_from_points(src, dst), [0, 0, 1]]))  # output pixel -> input pixel
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
    sy = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
    warped = np.stack([ndimage.map_coordinates(x[..., ch], [sy, sx], order=1, mode="mirror") for ch in range(3)], -1)
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    out = np.stack([ndimage.map_coordinates(warped[..., ch], [rows + dy, cols + dx], order=1, mode="reflect")
                    for ch in range(3)], -1)
    return _clip(out)


def _to_pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(_clip(x) * 255).astype(np.uint8))


def pixelate(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[:2]
    img = _to_pil(x).resize((int(w * c), int(h * c)), Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float64) / 255.0


def jpeg_compression(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    quality = [80, 65, 58, 50, 40][severity - 1]
    buffer = io.BytesIO()
    _to_pil(x).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255.0


CORRUPTION_FUNCTIONS: dict[str, Callable[[np.ndarray, int, Rng], np.ndarray]] = {
    name: globals()[name] for name in CORRUPTIONS
}


def check_corruption(name: str, severity: int) -> None:
    if name not in CORRUPTION_FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; the CIFAR-10-C corruptions are: {', '.join(CORRUPTIONS)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity must be 1-5, got {severity}")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 -> corrupted (H, W, 3) uint8, deterministic in (image, name, severity, seed).

    Float results are truncated to uint8 as the released CIFAR-10-C files were (``np.uint8(x * 255)``).
    """
    check_corruption(name, severity)
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"corrupt expects an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity, zlib.crc32(image.tobytes())])
    out = CORRUPTION_FUNCTIONS[name](image.astype(np.float64) / 255.0, severity, rng)
    return (_clip(out) * 255).astype(np.uint8)


def load_corrupted_npy(root: str | Path, name: str, severity: int, num_images: int = 10_000
                       ) -> tuple[np.ndarray, np.ndarray]:
    """One (corruption, severity) of the official CIFAR-10-C / CIFAR-100-C release.

    ``root/<name>.npy`` holds (5 * num_images, 32, 32, 3) uint8, severities 1..5 in consecutive blocks of
    ``num_images``; ``root/labels.npy`` the matching labels. Returns images (num_images, 32, 32, 3), labels.
    """
    check_corruption(name, severity)
    root = Path(root).expanduser()
    images_path, labels_path = root / f"{name}.npy", root / "labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: download CIFAR-10-C (https://zenodo.org/record/2535967) or CIFAR-100-C "
                "(https://zenodo.org/record/3555552), extract it and pass its folder as corrupted_dir (absolute or "
                "relative to data_dir)"
            )
    images = np.load(images_path, mmap_mode="r", allow_pickle=False)
    labels = np.load(labels_path, allow_pickle=False)
    if len(images) != 5 * num_images or len(labels) != len(images):
        raise ValueError(f"{images_path} has {len(images)} images and {len(labels)} labels; expected "
                         f"{5 * num_images} of each (5 severities x num_images={num_images}, the size of test_file); "
                         "for the official release (10,000 images per severity) set test_file: null, which takes the "
                         "images and labels from the release alone")
    block = slice((severity - 1) * num_images, severity * num_images)
    return np.asarray(images[block]), np.asarray(labels[block]).astype(np.int64)


class Corrupt:
    """A transform: PIL image or (H, W, 3) uint8 array -> corrupted PIL image; put it first in any pipeline.

    Args:
        name: one of :data:`CORRUPTIONS`.
        severity: 1-5.
        seed: corruption seed; the same image always gets the same corruption for a given seed.
    """

    def __init__(self, name: str, severity: int = 5, seed: int = 0) -> None:
        check_corruption(name, severity)
        self.name, self.severity, self.seed = name, severity, seed

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image:
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        return Image.fromarray(corrupt(array, self.name, self.severity, self.seed))

    def __repr__(self) -> str:
        return f"Corrupt({self.name!r}, severity={self.severity}, seed={self.seed})"


class CorruptedDataset(Dataset):
    """Wrap any image dataset whose items are ``(image, label)`` (PIL or uint8 HWC): corrupt, then ``transform``."""

    def __init__(self, dataset: Dataset, name: str, severity: int = 5, seed: int = 0,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.dataset, self.corrupt, self.transform = dataset, Corrupt(name, severity, seed), transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.dataset[index]
        out = self.corrupt(image)
        return (self.transform(out) if self.transform is not None else out), label


def uint8_images_to_tensor(images: np.ndarray, data_config: dict[str, Any]) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, C, H', W') float, resized to ``input_size`` and normalised.

    C is 3, or 1 for a gray backbone (ITU-R 601 luma, as ``DigitImages`` and PIL's "L" weigh the channels).
    """
    _, h, w = data_config["input_size"]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    if image_channels(data_config) == 1:
        x = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA))[:, None]  # (N, 1, H, W)
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


class UInt8Images(Dataset):
    """(N, H, W, 3) uint8 images kept at their stored size; each item is resized and normalised when it is read.

    Equals :func:`uint8_images_to_tensor` on the whole array, without holding N float images at the backbone's
    size (15 CIFAR-10-C sets of 10,000 images at 224x224 would take ~90 GB); workers receive only the uint8 bytes.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | Tensor, data_config: dict[str, Any]) -> None:
        image_channels(data_config)  # a channel count that images cannot have fails in setup, not in a worker
        self.images = np.ascontiguousarray(images)  # (N, H, W, 3) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.data_config = dict(data_config)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return uint8_images_to_tensor(self.images[index][None], self.data_config)[0], self.labels[index]

    @property
    def targets(self) -> list[int]:
        """The labels, without resizing an image (what class subsets need)."""
        return self.labels.tolist()


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@register_datamodule("npz_images")
class NpzImages(TransferDataModule):
    """RGB images in ``.npz`` files (``x`` (N, H, W, 3) uint8, ``y`` (N,)), tested clean or under corruptions.

    The default files are the CIFAR-10 subsets of ``../shared/data``. With ``corruptions``, testing runs one test
    dataloader per (corruption, severity), in order, so a test-time method can reset between them and the metrics
    are reported per corruption (``test/acc/dataloader_idx_i``, names in :attr:`test_names`). Corruptions are
    computed on the fly (deterministic in ``corruption_seed``), or read from the official CIFAR-10-C / CIFAR-100-C
    ``.npy`` release when ``corrupted_dir`` is given.

    Args:
        data_dir: folder the file names are relative to (default ``$LT_DATA_DIR`` or ``~/.cache/lightning_transfer``).
        train_file: npz with the training images (also the source of CAFA's statistics); ``None`` for none.
        test_file: npz with the clean test images; ``None`` with ``corrupted_dir`` (e.g. CIFAR-100-C, whose release
            has no clean images): the number of images and classes come from its ``labels.npy``.
        corruptions: CIFAR-10-C corruption names (``["all"]`` for the 15); ``None`` tests on clean images.
        severities: severities 1-5 to test each corruption at (``None``: ``[5]``).
        corruption_seed: seed of the on-the-fly corruptions.
        corrupted_dir: folder of the official ``<corruption>.npy`` + ``labels.npy`` files to use instead; a
            relative path is relative to ``data_dir``, like ``train_file`` and ``test_file``.
        val_fraction: fraction of each training class held out for validation (with ``num_shots``, min(K, 4)
            images per class of it, as in CoOp).
        class_names: class names (default: CIFAR-10's when there are 10 classes, else "0", "1", ...).
        batch_size: batch size of every loader.
        **kwargs: see :class:`TransferDataModule` (num_workers, num_shots, seed, data_config).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        train_file: str | None = "cifar10_train1000/cifar10_train_first1000.npz",
        test_file: str | None = "cifar10_test1000/cifar10_test_first1000.npz",
        corruptions: list[str] | None = None,
        severities: list[int] | None = None,
        corruption_seed: int = 0,
        corrupted_dir: str | None = None,
        val_fraction: float = 0.1,
        class_names: list[str] | None = None,
        batch_size: int = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, batch_size=batch_size, **kwargs)
        names = list(CORRUPTIONS) if corruptions == ["all"] else list(corruptions or [])
        self.severities = [5] if severities is None else list(severities)  # [] is an error, not the default
        if not self.severities:
            raise ValueError("severities is empty: list the severities 1-5 to test each corruption at, e.g. [5], or "
                             "leave it null for [5]")
        for name in names:
            for severity in self.severities:
                check_corruption(name, severity)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if test_file is None and (corrupted_dir is None or not names):
            raise ValueError("test_file=None needs corrupted_dir and corruptions (the test images come from the "
                             "released .npy files)")
        self.corruptions, self.corruption_seed = names, corruption_seed
        self.corrupted_dir = corrupted_dir
        self.train_file, self.test_file, self.val_fraction = train_file, test_file, val_fraction
        self._class_names = class_names

    @property
    def test_names(self) -> list[str]:
        """Name of each test dataloader: ``clean`` or ``<corruption>-<severity>``."""
        return [f"{n}-{s}" for n in self.corruptions for s in self.severities] or ["clean"]

    def _read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: set data_dir to the folder holding {name!r} (for the "
                                    "CIFAR-10 subsets, the project's ../shared/data) or pass train_file/test_file")
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"]), np.asarray(data["y"]).astype(np.int64)

    @property
    def class_names(self) -> list[str]:
        if self._class_names is not None:
            return list(self._class_names)
        y = self._read(self.test_file)[1] if self.test_file is not None else self._released_labels()
        n = int(y.max()) + 1
        return CIFAR10_CLASSES if n == 10 else [str(i) for i in range(n)]

    @property
    def class_names_generated(self) -> bool:  # type: ignore[override]  # a flag attribute on the base
        """True when no ``class_names`` were given and the class count is not CIFAR-10's: the names are "0", ..."""
        return self._class_names is None and self.class_names != CIFAR10_CLASSES

    def _corrupted_root(self) -> Path:
        """``corrupted_dir``, relative to ``data_dir`` unless absolute (the working directory never matters)."""
        return self.data_dir / Path(str(self.corrupted_dir)).expanduser()  # an absolute right side replaces data_dir

    def _released_labels(self) -> np.ndarray:
        path = self._corrupted_root() / "labels.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: download CIFAR-10-C (https://zenodo.org/record/2535967) or "
                                    "CIFAR-100-C (https://zenodo.org/record/3555552) and pass its folder as "
                                    "corrupted_dir")
        return np.load(path, allow_pickle=False).astype(np.int64)

    def _test_images(self, x: np.ndarray | None, y: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        if x is None or y is None:  # only the released files: 5 severities of num_images each
            num_images = len(self._released_labels()) // 5
            return [load_corrupted_npy(self._corrupted_root(), name, severity, num_images=num_images)
                    for name in self.corruptions for severity in self.severities]
        if not self.corruptions:
            return [(x, y)]
        sets = []
        for name in self.corruptions:
            for severity in self.severities:
                if self.corrupted_dir is not None:
                    sets.append(load_corrupted_npy(self._corrupted_root(), name, severity, num_images=len(x)))
                else:
                    sets.append((np.stack([corrupt(img, name, severity, self.corruption_seed) for img in x]), y))
        return sets

    def setup(self, stage: str | None = None) -> None:
        cfg = self.data_config()
        if stage not in ("fit", "validate") and not self.test_sets:  # corrupting is the slow part: only to test
            x, y = self._read(self.test_file) if self.test_file is not None else (None, None)
            self.test_sets = [UInt8Images(xi, yi, cfg) for xi, yi in self._test_images(x, y)]
            self.datasets["test"] = self.test_sets[0]
        if self.train_file is not None and "train" not in self.datasets:
            tx, ty = self._read(self.train_file)
            rest, held = stratified_split(ty.tolist(), self.val_fraction, seed=self.seed)
            if self.num_shots is not None:  # K per class; validation min(K, 4) per class, as in CoOp
                rest = [rest[i] for i in fewshot_indices(ty[rest].tolist(), self.num_shots, self.seed)]
                held = [held[i] for i in fewshot_indices(ty[held].tolist(), min(self.num_shots, 4), self.seed,
                                                         strict=False)]
            self.splits = {"train": rest, "val": held}
            self.datasets["train"] = UInt8Images(tx[rest], ty[rest], cfg)
            self.datasets["val"] = UInt8Images(tx[held], ty[held], cfg)
        self.log_split_digest()
