"""CoOp's few-shot benchmark protocol (Zhou et al., IJCV 2022, arXiv 2109.01134): split files and class names.

CoOp fixes the train/val/test lists of its 11 datasets in published ``split_zhou_<Dataset>.json`` files
(``{"train" | "val" | "test": [[path relative to the image folder, label, class name], ...]}``); FGVCAircraft uses the
official variant lists (``images_variant_{train,val,test}.txt``) and ImageNet its ``train``/``val`` folders named by
a ``classnames.txt``. The readers here turn these into class names and per-split ``(absolute path, label)`` lists.
They only read text, and every error names the file it read.

Class names are cleaned as CoOp's prompt learner does (underscores become spaces). The ``*_name`` rules map
torchvision's class names to the names CoOp's dataset scripts wrote into the split files, so both protocols prompt a
text encoder with the same words.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_transfer.datamodules.files import Sample, check_labels, image_files

COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
SPLITS = ("train", "val", "test")

# CoOp's EuroSAT names (folder -> prompt name), written into split_zhou_EuroSAT.json
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}
# CoOp's Caltech-101 renames (plural folder names -> singular nouns); every other folder keeps its name
CALTECH101_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def clean_class_name(name: str) -> str:
    """A class name as it goes into a prompt: underscores become spaces (as CoOp), white space collapsed."""
    return " ".join(name.replace("_", " ").split())


def oxford_pets_name(name: str) -> str:
    """torchvision's ``"American Bulldog"`` -> CoOp's ``"american bulldog"`` (CoOp lower-cases the breed)."""
    return name.lower()


def stanford_cars_name(name: str) -> str:
    """``"AM General Hummer SUV 2000"`` -> ``"2000 AM General Hummer SUV"`` (CoOp puts the year first)."""
    *model, year = name.split(" ")
    return " ".join([year, *model])


def sun397_name(name: str) -> str:
    """``"apartment_building/outdoor"`` -> ``"outdoor apartment_building"`` (CoOp puts indoor/outdoor first)."""
    return " ".join(reversed(name.split("/")))


def eurosat_name(name: str) -> str:
    return EUROSAT_NAMES.get(name, name)


def caltech101_name(name: str) -> str:
    return CALTECH101_NAMES.get(name, name)


def _read_text(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} not found: the dataset folder is incomplete") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e


def read_coop_split(path: Path, image_dir: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """Class names (cleaned, by label) and train/val/test samples of a ``split_zhou_*.json`` file.

    Labels must be ``0..C-1`` where C is the number of distinct labels, and each label must carry one class name;
    a label outside that range fails with the image that has it.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"CoOp split file {str(path)!r} not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read CoOp split file {str(path)!r}: {e}; download it again") from e
    if not isinstance(data, dict):
        raise ValueError(f"CoOp split file {str(path)!r} is not a JSON object with train/val/test lists")
    names: dict[int, str] = {}
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        items = data.get(split)
        if not isinstance(items, list):
            raise ValueError(f"CoOp split file {str(path)!r} has no {split!r} list of [path, label, class name]")
        samples = []
        for item in items:
            try:
                relative, label, name = item
                label = int(label)
            except (TypeError, ValueError):
                raise ValueError(f"{str(path)!r}: {split} item {item!r} is not [path, label, class name]") from None
            if names.setdefault(label, str(name)) != name:
                raise ValueError(f"{str(path)!r}: label {label} is named both {names[label]!r} and {name!r}")
            samples.append((str(image_dir / relative), label))
        splits[split] = samples
    for split, samples in splits.items():
        check_labels(samples, len(names), f"CoOp split file {str(path)!r} ({split})")
    return [clean_class_name(names[i]) for i in range(len(names))], splits


def read_fgvc_variants(folder: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """FGVC-Aircraft's variant-level splits from its ``data`` folder (``variants.txt`` + ``images_variant_*.txt``).

    This is CoOp's protocol for the dataset (the official train/val/test lists; CoOp publishes no json for it).
    """
    names = [line for line in _read_text(folder / "variants.txt") if line]
    index = {name: i for i, name in enumerate(names)}
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        file = folder / f"images_variant_{split}.txt"
        samples = []
        for number, line in enumerate(_read_text(file), 1):
            if not line:
                continue
            image_id, _, variant = line.partition(" ")
            if variant not in index:
                raise ValueError(f"{str(file)!r} line {number}: variant {variant!r} of image {image_id} is not in "
                                 f"{str(folder / 'variants.txt')!r}")
            samples.append((str(folder / "images" / f"{image_id}.jpg"), index[variant]))
        splits[split] = samples
    return [clean_class_name(n) for n in names], splits


def read_imagenet_folders(folder: Path, classnames: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """ImageNet from ``folder/{train,val}/<wnid>/*`` with names from ``classnames`` (lines ``<wnid> <name>``).

    Labels follow the sorted WordNet ids, as in CoOp. Without a ``classnames`` file the WordNet ids are the names
    (fine for a linear head, useless for prompts). The validation folder is both validation and test set (CoOp).
    """
    wnids = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    val_wnids = sorted(p.name for p in (folder / "val").iterdir() if p.is_dir())
    if val_wnids != wnids:
        extra = sorted(set(val_wnids) ^ set(wnids))[:5]
        raise ValueError(f"ImageNet: {str(folder / 'train')!r} and {str(folder / 'val')!r} have different class "
                         f"folders (e.g. {extra}); both need one folder per WordNet id")
    names = wnid_names(classnames, wnids) if classnames.is_file() else wnids
    splits = {split: [(str(p), label) for label, wnid in enumerate(wnids)
                      for p in image_files(folder / split / wnid)] for split in ("train", "val")}
    splits["test"] = splits["val"]
    return names, splits


def wnid_names(classnames: Path, wnids: list[str]) -> list[str]:
    """The prompt name of each WordNet id in ``wnids``, from a ``classnames.txt`` of lines ``<wnid> <name>``."""
    table = {}
    for line in _read_text(classnames):
        wnid, _, name = line.partition(" ")
        if wnid:
            table[wnid] = name.strip()
    unnamed = [w for w in wnids if w not in table]
    if unnamed:
        raise ValueError(f"{str(classnames)!r} has no name for the class folders {unnamed[:5]} "
                         f"({len(unnamed)} in all); it needs one line '<wnid> <class name>' per folder")
    return [clean_class_name(table[w]) for w in wnids]
