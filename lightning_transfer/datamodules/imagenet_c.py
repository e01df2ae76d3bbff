"""ImageNet-C (Hendrycks and Dietterich, ICLR 2019, arXiv 1903.12261) in its released folder layout.

``<root>/<corruption>/<severity>/<wnid>/*.JPEG``: 15 benchmark corruptions (plus 4 held-out ones) at severities
1-5, 50,000 validation images each. Testing runs one dataloader per (corruption, severity), in order, as
:class:`~lightning_transfer.datamodules.corruption.NpzImages` does, so a test-time method can reset between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_transfer.datamodules.base import fewshot_indices
from lightning_transfer.datamodules.coop_splits import wnid_names
from lightning_transfer.datamodules.corruption import CORRUPTIONS
from lightning_transfer.datamodules.files import FileListDataModule, Sample, check_labels, image_files
from lightning_transfer.registry import register_datamodule

EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # the released held-out four


@register_datamodule("imagenet_c")
class ImageNetC(FileListDataModule):
    """ImageNet-C: one test set per (corruption, severity) from the released folders; optional clean training data.

    Classes are the WordNet ids (``n01440764`` ...) of the first test set's folders, sorted (the ImageNet label
    order); every set must have the same. Their names are the WordNet ids, or with ``classnames`` (CoOp's ImageNet
    ``classnames.txt``) real names, which CLIP's zero-shot and prompt methods need. ``images_per_class`` evaluates
    on a fixed subset (the same files in every set, drawn with ``seed``), as TTA papers often do for speed.
    ``clean_dir`` (``<clean_dir>/<wnid>/*``, e.g. the clean ImageNet validation set) gives training and validation
    images (source statistics for CAFA, or fitting); without it there is nothing to fit on. Images go through the
    backbone's evaluation transform; caching is for subsets only (50,000 images at 224x224 take 7.5 GB per set).

    Args:
        root: the ImageNet-C folder; default ``<data_dir>/ImageNet-C``.
        corruptions: corruption names (``["all"]`` for the 15 benchmark ones).
        severities: severities 1-5 to test each corruption at (``None``: ``[5]``).
        images_per_class: test on this many images per class of every set (``None``: all 50).
        clean_dir: clean images in ``<wnid>/<image>`` folders, split into training and validation sets.
        classnames: a text file of lines ``<wnid> <class name>`` (CoOp's ``classnames.txt``) naming every class;
            relative to ``data_dir``. Without it the class names are the WordNet ids (fine for a linear head).
        batch_size: batch size of every loader.
        **kwargs: see :class:`~lightning_transfer.datamodules.files.FileListDataModule` (cache_images,
            val_fraction: the share of each clean class held out; num_shots, seed, ...). There is no ``augment``:
            every image goes through the evaluation transform.
    """

    class_names_fix = ("pass data.init_args.classnames, a file of lines '<wnid> <class name>' such as CoOp's "
                       "ImageNet classnames.txt")

    def __init__(
        self,
        root: str | None = None,
        corruptions: list[str] | None = None,
        severities: list[int] | None = None,
        images_per_class: int | None = None,
        clean_dir: str | None = None,
        classnames: str | None = None,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(augment=False, batch_size=batch_size, **kwargs)
        names = list(CORRUPTIONS) if corruptions in (None, ["all"]) else list(corruptions)
        for name in names:
            if name not in CORRUPTIONS + EXTRA_CORRUPTIONS:
                raise ValueError(f"unknown ImageNet-C corruption {name!r}; the 15 benchmark corruptions are "
                                 f"{', '.join(CORRUPTIONS)} (held out: {', '.join(EXTRA_CORRUPTIONS)})")
        if not names:  # an empty list would leave no test set, and fail later on a missing first set
            raise ValueError("corruptions is empty: name at least one ImageNet-C corruption, or leave it null (or "
                             "['all']) for the 15 benchmark ones")
        self.severities = [5] if severities is None else list(severities)  # [] is an error, not the default
        if not self.severities or any(s not in range(1, 6) for s in self.severities):
            raise ValueError(f"severities must be in 1-5 (a non-empty list; null for [5]), got {severities}")
        if images_per_class is not None and images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        self.corruptions, self.images_per_class = names, images_per_class
        self.root = Path(root).expanduser() if root else self.data_dir / "ImageNet-C"
        self.clean_dir = Path(clean_dir).expanduser() if clean_dir else None
        self.classnames = self.data_dir / Path(classnames).expanduser() if classnames else None
        # the WordNet ids are no names to prompt with: CLIP's methods refuse them unless a classnames file is given
        self.class_names_generated = self.classnames is None
        self.variant = f"imagenet-c/{'all' if images_per_class is None else images_per_class}-per-class"
        self._wnids: list[str] | None = None

    @property
    def test_names(self) -> list[str]:
        """Name of each test dataloader: ``<corruption>-<severity>``."""
        return [f"{c}-{s}" for c in self.corruptions for s in self.severities]

    def _set_dir(self, name: str) -> Path:
        corruption, severity = name.rsplit("-", 1)
        folder = self.root / corruption / severity
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet-C set {name} not found: no folder {folder}. Download ImageNet-C (zenodo.org/record/2235448"
                f", e.g. noise.tar, blur.tar, weather.tar, digital.tar), extract it into {self.root} so that it holds "
                "<corruption>/<severity>/<wnid>/*.JPEG, or set data.init_args.root")
        return folder

    @property
    def wnids(self) -> list[str]:
        """The sorted class folders of the first test set (the label order)."""
        if self._wnids is None:
            folder = self._set_dir(self.test_names[0])
            self._wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
            if not self._wnids:
                raise FileNotFoundError(f"{folder} has no class folders (<wnid>/<image>)")
        return list(self._wnids)

    @property
    def class_names(self) -> list[str]:
        if self.classnames is None:
            return self.wnids
        if not self.classnames.is_file():
            raise FileNotFoundError(f"classnames file {self.classnames} not found: pass CoOp's ImageNet classnames.txt "
                                    "(lines '<wnid> <class name>'), relative to data_dir or absolute, or leave it "
                                    "unset for WordNet ids as names")
        return wnid_names(self.classnames, self.wnids)

    def _folder_samples(self, folder: Path) -> list[Sample]:
        index = {name: i for i, name in enumerate(self.wnids)}
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if classes != self.wnids:
            raise ValueError(f"the class folders of {folder} differ from those of {self._set_dir(self.test_names[0])}"
                             f" ({len(classes)} vs {len(index)}); every set needs the same wnids")
        return [(str(p), index[p.parent.name]) for c in classes for p in image_files(folder / c)]

    def load_samples(self) -> dict[str, list[Sample]]:
        if self.clean_dir is None:
            return {"train": []}
        if not self.clean_dir.is_dir():
            raise FileNotFoundError(f"clean_dir {self.clean_dir} not found: pass the folder of clean images in "
                                    "<wnid>/<image> folders (e.g. the ImageNet validation set), or leave it unset")
        return {"train": self._folder_samples(self.clean_dir)}

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate") and self.clean_dir is None:
            raise ValueError("ImageNetC has only test sets: pass clean_dir (clean <wnid>/<image> folders) to fit or "
                             "validate, or run `test`")
        if self.test_sets:
            return
        raw = self.load_samples()
        self.samples = {k: v for k, v in self._resolve_splits(raw).items() if k != "test"} if raw["train"] else {}
        for name in self.test_names:
            samples = self._folder_samples(self._set_dir(name))
            if self.images_per_class is not None:  # same seed and same sorted files: the same images in every set
                samples = [samples[i] for i in fewshot_indices([y for _, y in samples], self.images_per_class,
                                                               self.seed, strict=False)]  # "up to" per class
            self.samples[f"test/{name}"] = samples
        for split, samples in self.samples.items():
            check_labels(samples, len(self.wnids), f"ImageNetC {split}")
        self.splits = {k: [p for p, _ in v] for k, v in self.samples.items()}
        if "train" in self.samples:
            self.datasets = {"train": self._dataset(self.samples["train"], True),
                             "val": self._dataset(self.samples["val"], False)}
        self.test_sets = [self._dataset(self.samples[f"test/{name}"], False) for name in self.test_names]
        self.datasets["test"] = self.test_sets[0]
        self.log_split_digest()

    def _relative(self, path: str) -> str:
        if self.clean_dir is not None and Path(path).is_relative_to(self.clean_dir):
            return f"clean/{Path(path).relative_to(self.clean_dir)}"  # hashed without the machine's folder names
        return super()._relative(path)
