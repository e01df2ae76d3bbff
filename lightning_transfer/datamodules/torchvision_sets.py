"""The image-classification transfer benchmarks of CoOp and CLIP (Oxford Pets, Flowers102, DTD, ..., ImageNet).

Every dataset reads one of two protocols from one ``data_dir`` (CoOp's ``DATASET.ROOT``):

* ``protocol="coop"`` (default): CoOp's published split file ``split_zhou_<Dataset>.json`` (FGVCAircraft: the
  official variant lists; ImageNet: ``train``/``val`` folders + ``classnames.txt``), class names as CoOp prompts
  them. The images may sit in CoOp's folder layout (``oxford_pets/images``, ``dtd/images``, ...; see CoOp's
  DATASETS.md) or in the one torchvision downloads to (``oxford-iiit-pet/images``, ``dtd/dtd/images``, ...): split
  paths are relative to the image folder, so both give the same samples and the same split hash.
* ``protocol="torchvision"``: torchvision's own splits (``torchvision.datasets.<X>(split=...)``), converted to file
  lists; datasets without an official split (EuroSAT, Caltech101, SUN397) hold out 30% of every class as test set
  with seed 0. Class names are mapped to CoOp's.

``download=True`` fetches the images with torchvision (md5-checked) where torchvision can; the CoOp split file is
never downloaded (put it where the error message says). K-shot sampling (``num_shots``, ``seed``: K training and
``min(K, 4)`` validation images per class, as in CoOp), the uint8 cache and the logged split hash come from
:class:`~lightning_transfer.datamodules.files.FileListDataModule`. The K-shot draw is this package's (seeded numpy),
not CoOp's Python ``random`` draw, so the split membership is CoOp's and the K images are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from lightning_transfer.datamodules import coop_splits as coop
from lightning_transfer.datamodules.base import stratified_split
from lightning_transfer.datamodules.files import FileListDataModule, Sample
from lightning_transfer.registry import register_datamodule

SplitProtocol = Literal["coop", "torchvision"]
TEST_FRACTION = 0.3  # test share per class where torchvision has no split (CoOp's own splits use 50/20/30)


class BenchmarkDataModule(FileListDataModule):
    """Base of the benchmark datasets: a table of folder names per dataset, two protocols (see module docstring).

    Args:
        protocol: ``"coop"`` (CoOp's split file) or ``"torchvision"`` (torchvision's own splits).
        download: download the images with torchvision when they are missing (not the CoOp split file).
        split_file: path of the CoOp split file; default ``split_zhou_<Dataset>.json`` in the dataset folder
            (FGVCAircraft and ImageNet have no split file and ignore it).
        data_dir: the root holding the dataset folders; default ``$LT_DATA_DIR`` or ``~/.cache/lightning_transfer``.
        **kwargs: see :class:`~lightning_transfer.datamodules.files.FileListDataModule` (augment, cache_images for
            K-shot training sets, val_fraction, batch_size, num_shots, seed, ...).
    """

    coop_dir: ClassVar[str] = ""  # dataset folder in CoOp's layout, under data_dir
    tv_dir: ClassVar[str | None] = None  # dataset folder in torchvision's layout; None: torchvision has no such set
    images: ClassVar[str] = ""  # image folder inside either dataset folder (the root of the split's paths)
    coop_split: ClassVar[str] = ""  # <Dataset> in split_zhou_<Dataset>.json
    tv_class: ClassVar[str] = ""  # torchvision.datasets class
    tv_splits: ClassVar[dict[str, str] | None] = None  # our split -> torchvision's; None: one unsplit set
    tv_kwargs: ClassVar[dict[str, Any]] = {}
    downloadable: ClassVar[bool] = True
    url: ClassVar[str] = ""  # where a user gets the data by hand

    def __init__(
        self,
        protocol: SplitProtocol = "coop",
        download: bool = False,
        split_file: str | None = None,
        data_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        name = type(self).__name__
        if protocol not in ("coop", "torchvision"):
            raise ValueError(f"{name}: protocol must be 'coop' or 'torchvision', got {protocol!r}")
        if protocol == "torchvision" and self.tv_dir is None:
            raise ValueError(f"{name} has no torchvision dataset; use protocol='coop' (CoOp's folder layout)")
        if download and not (self.downloadable and self.tv_dir is not None):
            raise ValueError(f"{name} cannot be downloaded automatically; get it from {self.url} and set "
                             "download=false")
        self.protocol, self.download = protocol, download
        self.split_file = Path(split_file).expanduser() if split_file else None
        self.root: Path | None = None
        self._data: tuple[list[str], dict[str, list[Sample]]] | None = None

    @staticmethod
    def tv_name(name: str) -> str:
        """torchvision's class name -> CoOp's (before cleaning); most datasets use the same names."""
        return name

    # ---- the FileListDataModule surface --------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self._read()[0])

    def load_samples(self) -> dict[str, list[Sample]]:
        return self._read()[1]

    def prepare_data(self) -> None:
        self._read()  # downloads (download=True) or fails here, before training, with where the data should be

    def _read(self) -> tuple[list[str], dict[str, list[Sample]]]:
        if self._data is None:
            self._data = self._read_coop() if self.protocol == "coop" else self._read_torchvision()
        return self._data

    # ---- CoOp protocol -------------------------------------------------------------------------------------
    def _folders(self) -> list[Path]:
        return [self.data_dir / d for d in (self.coop_dir, self.tv_dir) if d is not None]

    def _dataset_folder(self) -> Path:
        """The dataset folder whose image folder exists (CoOp's layout first); downloads it when asked."""
        for folder in self._folders():
            if (folder / self.images).is_dir():
                return folder
        if self.download and self.tv_dir is not None:
            self._torchvision(next(iter(self.tv_splits.values())) if self.tv_splits else None)
            if (self.data_dir / self.tv_dir / self.images).is_dir():
                return self.data_dir / self.tv_dir
        raise self._missing()

    def _read_coop(self) -> tuple[list[str], dict[str, list[Sample]]]:
        folder = self._dataset_folder()
        self.root = folder / self.images
        candidates = [self.split_file] if self.split_file else [
            f / f"split_zhou_{self.coop_split}.json" for f in dict.fromkeys([folder, *self._folders()])]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{type(self).__name__}: CoOp split file not found (looked at {', '.join(map(str, candidates))}); "
                f"download split_zhou_{self.coop_split}.json (links in {coop.COOP_DATASETS_URL}) into "
                f"{self.data_dir / self.coop_dir}, pass data.split_file=<path>, or use data.protocol=torchvision")
        self.variant, self.listed_in = f"coop:{found[0].name}", str(found[0])
        return coop.read_coop_split(found[0], self.root)

    def _missing(self) -> FileNotFoundError:
        folders = self._folders() if self.protocol == "coop" else [self.data_dir / str(self.tv_dir)]
        looked = [str(f / self.images) for f in folders]
        how = "pass data.download=true (torchvision downloads it) or " if self.downloadable and self.tv_dir else ""
        split = (f", with CoOp's split file split_zhou_{self.coop_split}.json ({coop.COOP_DATASETS_URL}) in "
                 f"{self.data_dir / self.coop_dir}") if self.protocol == "coop" and self.coop_split else ""
        return FileNotFoundError(
            f"{type(self).__name__}: no images at {' or '.join(looked)}; {how}download it from {self.url} and "
            f"extract it so that the images are in {looked[0]}{split} (data_dir is {self.data_dir})")

    # ---- torchvision protocol ------------------------------------------------------------------------------
    def _torchvision(self, split: str | None) -> Any:
        import torchvision.datasets

        kwargs = dict(self.tv_kwargs, **({"split": split} if split is not None else {}))
        try:
            return getattr(torchvision.datasets, self.tv_class)(str(self.data_dir), download=self.download, **kwargs)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(f"{self._missing()} (torchvision: {e})") from e

    def _read_torchvision(self) -> tuple[list[str], dict[str, list[Sample]]]:
        assert self.tv_dir is not None
        self.root = self.data_dir / self.tv_dir / self.images
        if not self.root.is_dir() and not self.download:
            raise self._missing()
        raw: dict[str, list[Sample]] = {}
        names: list[str] = []
        splits: dict[str, str | None] = dict(self.tv_splits) if self.tv_splits else {"all": None}
        for ours, theirs in splits.items():
            dataset = self._torchvision(theirs)
            raw[ours] = [(str(p), int(y)) for p, y in self._tv_samples(dataset)]
            names = names or [coop.clean_class_name(self.tv_name(c)) for c in self._tv_classes(dataset)]
        if self.tv_splits is None:
            everything = raw.pop("all")
            rest, held = stratified_split([y for _, y in everything], TEST_FRACTION, seed=0)
            raw = {"train": [everything[i] for i in rest], "test": [everything[i] for i in held]}
            self.variant = f"torchvision:test{TEST_FRACTION:.0%}-seed0"
        else:
            self.variant = "torchvision:" + "/".join(self.tv_splits.values())
        return names, raw

    def _tv_samples(self, dataset: Any) -> list[tuple[Any, int]]:
        """(path, label) pairs of a torchvision dataset, from the attribute that holds them."""
        for attribute in ("_samples", "samples"):
            if hasattr(dataset, attribute):
                return list(getattr(dataset, attribute))
        files = dataset._image_files if hasattr(dataset, "_image_files") else dataset._images
        return list(zip(files, dataset._labels))

    def _tv_classes(self, dataset: Any) -> list[str]:
        return list(dataset.classes)


@register_datamodule("oxford_pets")
class OxfordPets(BenchmarkDataModule):
    """Oxford-IIIT Pet, 37 breeds (Parkhi et al., CVPR 2012); torchvision ``OxfordIIITPet`` (trainval/test)."""

    coop_dir, tv_dir, images, coop_split = "oxford_pets", "oxford-iiit-pet", "images", "OxfordPets"
    tv_class, tv_splits = "OxfordIIITPet", {"train": "trainval", "test": "test"}
    tv_name = staticmethod(coop.oxford_pets_name)
    url = "https://www.robots.ox.ac.uk/~vgg/data/pets/"


@register_datamodule("flowers102")
class Flowers102(BenchmarkDataModule):
    """Oxford 102 Flowers (Nilsback and Zisserman, 2008); CoOp's ``OxfordFlowers``; torchvision train/val/test."""

    coop_dir, tv_dir, images, coop_split = "oxford_flowers", "flowers-102", "jpg", "OxfordFlowers"
    tv_class, tv_splits = "Flowers102", {"train": "train", "val": "val", "test": "test"}
    url = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"


@register_datamodule("dtd")
class DTD(BenchmarkDataModule):
    """Describable Textures, 47 classes (Cimpoi et al., CVPR 2014); torchvision partition 1 train/val/test."""

    coop_dir, tv_dir, images, coop_split = "dtd", "dtd/dtd", "images", "DescribableTextures"
    tv_class, tv_splits = "DTD", {"train": "train", "val": "val", "test": "test"}
    tv_kwargs = {"partition": 1}
    url = "https://www.robots.ox.ac.uk/~vgg/data/dtd/"


@register_datamodule("eurosat")
class EuroSAT(BenchmarkDataModule):
    """EuroSAT RGB, 10 land-use classes (Helber et al., 2019); CoOp's names ("Annual Crop Land", ...)."""

    coop_dir, tv_dir, images, coop_split = "eurosat", "eurosat", "2750", "EuroSAT"
    tv_class, tv_name = "EuroSAT", staticmethod(coop.eurosat_name)
    url = "https://github.com/phelber/EuroSAT"


@register_datamodule("food101")
class Food101(BenchmarkDataModule):
    """Food-101 (Bossard et al., ECCV 2014); torchvision train/test."""

    coop_dir, tv_dir, images, coop_split = "food-101", "food-101", "images", "Food101"
    tv_class, tv_splits = "Food101", {"train": "train", "test": "test"}
    url = "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/"


@register_datamodule("fgvc_aircraft")
class FGVCAircraft(BenchmarkDataModule):
    """FGVC-Aircraft, 100 variants (Maji et al., 2013); both protocols use the official variant lists.

    CoOp's layout is the archive's ``data`` folder renamed ``fgvc_aircraft`` (``images/``, ``variants.txt``,
    ``images_variant_{train,val,test}.txt``); there is no CoOp json for this dataset.
    """

    coop_dir, tv_dir, images = "fgvc_aircraft", "fgvc-aircraft-2013b/data", "images"
    tv_class, tv_splits = "FGVCAircraft", {"train": "train", "val": "val", "test": "test"}
    url = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"

    def _read_coop(self) -> tuple[list[str], dict[str, list[Sample]]]:
        folder = self._dataset_folder()
        self.root, self.variant = folder / self.images, "coop:images_variant"
        self.listed_in = str(folder / "images_variant_{train,val,test}.txt")
        return coop.read_fgvc_variants(folder)


@register_datamodule("stanford_cars")
class StanfordCars(BenchmarkDataModule):
    """Stanford Cars, 196 models (Krause et al., 2013); names "<year> <make> <model>" as in CoOp; no download."""

    coop_dir, tv_dir, images, coop_split = "stanford_cars", "stanford_cars", "", "StanfordCars"
    tv_class, tv_splits = "StanfordCars", {"train": "train", "test": "test"}
    tv_name = staticmethod(coop.stanford_cars_name)
    downloadable = False  # torchvision: "the original URL is broken"
    url = f"the Stanford Cars section of {coop.COOP_DATASETS_URL} (devkit/, cars_train/, cars_test/)"


@register_datamodule("caltech101")
class Caltech101(BenchmarkDataModule):
    """Caltech-101 (Fei-Fei et al., 2004): CoOp's 100 classes (no Faces_easy); torchvision keeps Faces_easy (101)."""

    coop_dir, tv_dir, images, coop_split = "caltech-101", "caltech101", "101_ObjectCategories", "Caltech101"
    tv_class, tv_name = "Caltech101", staticmethod(coop.caltech101_name)
    url = "https://data.caltech.edu/records/mzrjq-6wc02"

    def _tv_samples(self, dataset: Any) -> list[tuple[Any, int]]:
        # torchvision keeps only (category, running number) and builds the file name when an item is read
        folder = Path(dataset.root) / "101_ObjectCategories"
        return [(folder / dataset.categories[y] / f"image_{i:04d}.jpg", y) for y, i in zip(dataset.y, dataset.index)]

    def _tv_classes(self, dataset: Any) -> list[str]:
        return list(dataset.categories)


@register_datamodule("sun397")
class SUN397(BenchmarkDataModule):
    """SUN397 scenes (Xiao et al., CVPR 2010); names "outdoor apartment building" as in CoOp."""

    coop_dir, tv_dir, images, coop_split = "sun397", ".", "SUN397", "SUN397"
    tv_class, tv_name = "SUN397", staticmethod(coop.sun397_name)
    url = "https://vision.princeton.edu/projects/2010/SUN/"

    def _tv_samples(self, dataset: Any) -> list[tuple[Any, int]]:
        return sorted(zip(map(str, dataset._image_files), dataset._labels))  # torchvision's order is rglob's


@register_datamodule("ucf101")
class UCF101(BenchmarkDataModule):
    """UCF101 actions as CoOp's middle-frame images (``ucf101/UCF-101-midframes``); CoOp protocol only."""

    coop_dir, images, coop_split = "ucf101", "UCF-101-midframes", "UCF101"
    downloadable = False
    url = f"the UCF-101-midframes.zip link in {coop.COOP_DATASETS_URL}"


@register_datamodule("imagenet")
class ImageNet(BenchmarkDataModule):
    """ImageNet-1k from a local folder: ``imagenet/images/{train,val}/<wnid>/*`` + ``imagenet/classnames.txt``.

    Validation and test are the official validation images (CoOp; with ``num_shots`` validation is ``min(K, 4)``
    of them per class, test all). ``classnames.txt`` (lines ``<wnid> <name>``, linked from CoOp's DATASETS.md) gives
    the prompt names; without it the WordNet ids are the names.
    """

    coop_dir, images = "imagenet", "images"
    downloadable = False
    url = "https://image-net.org (ILSVRC2012 train and val, val sorted into class folders)"

    def _read_coop(self) -> tuple[list[str], dict[str, list[Sample]]]:
        folder = self._dataset_folder()
        self.root, self.variant = folder / self.images, "coop:imagenet-folders"
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise FileNotFoundError(f"ImageNet: no {str(self.root / split)!r}; it needs train/<wnid>/ and "
                                        "val/<wnid>/ folders (sort the validation images into class folders)")
        return coop.read_imagenet_folders(self.root, folder / "classnames.txt")
