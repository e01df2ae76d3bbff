"""What the datamodule tests know about every registered datamodule: how to build it offline, and its CLI options.

:data:`CASES` maps each registry name to a :class:`Case`: a writer of a tiny dataset in the datamodule's real
on-disk format (a few images per class, written in milliseconds) and the init kwargs that point at it. The contract
suite (``test_contract.py``) runs every case through the same checks; its meta-test fails when a registered
datamodule has no case here or no YAML under ``configs/data/``. Nothing is ever downloaded: the writers produce
the files a download would leave.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from lightning.pytorch.cli import LightningArgumentParser
from PIL import Image

from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.datamodules.corruption import NpzImages
from lightning_transfer.datamodules.torchvision_sets import BenchmarkDataModule
from lightning_transfer.registry import DATAMODULES
from tests.datamodules.test_digit_domains import write_mnist, write_usps_esl
from tests.datamodules.test_imagenet_c import write_imagenet_c
from tests.datamodules.test_vtab import write_vtab_task
from tests.helpers.text_models import tiny_bert_text_dir

IMAGE_CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.25, 0.25),
             "interpolation": "bilinear", "crop_pct": 1.0}
Kwargs = dict[str, Any]


def _construct(cls: type, kwargs: Kwargs) -> TransferDataModule:
    return cls(**kwargs)


@dataclass(frozen=True)
class Case:
    """How the contract suite builds one datamodule without a download.

    Attributes:
        write: writes a tiny dataset under the given folder (the monkeypatch is for checksums a real release
            pins) and returns the init kwargs that read it; ``batch_size``, ``num_shots``, ``seed`` and
            ``data_config`` are added by the suite.
        missing: the init kwargs pointing at the given empty folder instead; ``None`` where nothing can be
            missing (``nothing_missing`` says why).
        build: ``(cls, kwargs) -> datamodule``; default ``cls(**kwargs)`` (a wrapper builds its inner one).
        data_config: returns the backbone's preprocessing config the loaders are built for (a function: a text
            case's names a tokenizer folder, written on first use).
        shots: a K every class of the fixture's training pool has (the K-shot draw must have a choice).
        missing_stage: the ``setup`` stage that reads the missing data.
    """

    write: Callable[[Path, pytest.MonkeyPatch], Kwargs]
    missing: Callable[[Path], Kwargs] | None
    build: Callable[[type, Kwargs], TransferDataModule] = _construct
    data_config: Callable[[], dict[str, Any]] = lambda: dict(IMAGE_CFG)
    shots: int = 2
    missing_stage: str = "fit"
    nothing_missing: str = ""


# ---- image writers --------------------------------------------------------------------------------------------
def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


_IMAGE = _png()  # one tiny image, written under every name: the draws are over files, not pixels


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_IMAGE)


def _class_folders(root: Path, classes: list[str], per_class: int, suffix: str = ".png") -> None:
    for name in classes:
        for i in range(per_class):
            _image(root / name / f"{name}_{i}{suffix}")


# ---- the CoOp benchmarks -------------------------------------------------------------------------------------
def _coop(name: str) -> Case:
    """A CoOp-layout folder (images + ``split_zhou_<Dataset>.json``) from the class's own folder names."""
    cls: type[BenchmarkDataModule] = DATAMODULES.get(name)

    def write(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
        images = root / cls.coop_dir / cls.images
        split: dict[str, list] = {}
        for part, count in (("train", 4), ("val", 2), ("test", 2)):
            split[part] = []
            for label, cname in enumerate(("alpha_one", "beta", "gamma")):
                for i in range(count):
                    relative = f"{cname}/{part}_{i}.jpg"
                    _image(images / relative)
                    split[part].append([relative, label, cname])
        (root / cls.coop_dir / f"split_zhou_{cls.coop_split}.json").write_text(json.dumps(split))
        return {"data_dir": str(root)}

    return Case(write, lambda empty: {"data_dir": str(empty)})


def _fgvc(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    folder = root / "fgvc_aircraft"  # CoOp's layout: the archive's data/ folder renamed
    variants = ["707-320", "Cessna 172", "F-16A/B"]
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 1000000
    for part, count in (("train", 4), ("val", 2), ("test", 2)):
        lines = []
        for variant in variants:
            for _ in range(count):
                n += 1
                _image(folder / "images" / f"{n}.jpg")
                lines.append(f"{n} {variant}")
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    return {"data_dir": str(root)}


def _imagenet(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    wnids = ["n01440764", "n01443537", "n01484850"]
    for part, count in (("train", 4), ("val", 2)):
        _class_folders(root / "imagenet" / "images" / part, wnids, count, ".JPEG")
    (root / "imagenet" / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 shark\n")
    return {"data_dir": str(root)}


# ---- CIFAR: torchvision's pickled batches, with the md5s torchvision checks pinned to the fixture ---------------
def _cifar(tv_class: str) -> Callable[[Path, pytest.MonkeyPatch], Kwargs]:
    def write(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
        import hashlib

        import torchvision.datasets

        from lightning_transfer.datamodules.cifar import CIFAR100_CLASSES
        from lightning_transfer.datamodules.corruption import CIFAR10_CLASSES

        cls = getattr(torchvision.datasets, tv_class)
        names = CIFAR10_CLASSES if tv_class == "CIFAR10" else CIFAR100_CLASSES
        folder = root / cls.base_folder
        folder.mkdir(parents=True)
        label_key = "labels" if tv_class == "CIFAR10" else "fine_labels"
        rng = np.random.default_rng(0)
        per_file = {f: -(-4 // len(cls.train_list)) for f, _ in cls.train_list}  # 4+ images per class in all
        per_file.update({f: 1 for f, _ in cls.test_list})
        md5 = {}
        for file, per_class in per_file.items():
            labels = [c for c in range(len(names)) for _ in range(per_class)]
            entry = {label_key: labels, "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}
            (folder / file).write_bytes(pickle.dumps(entry))
        (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: names}))
        for file in [*per_file, cls.meta["filename"]]:
            md5[file] = hashlib.md5((folder / file).read_bytes()).hexdigest()
        monkeypatch.setattr(cls, "train_list", [[f, md5[f]] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, md5[f]] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})
        return {"data_dir": str(root)}

    return write


# ---- the rest ---------------------------------------------------------------------------------------------------
def _npz(root: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Kwargs:
    rng = np.random.default_rng(0)
    for name, n in (("train.npz", 40), ("test.npz", 12)):
        np.savez(root / name, x=rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8), y=np.arange(n) % 4)
    return {"data_dir": str(root), "train_file": "train.npz", "test_file": "test.npz"}


def _npz_missing(empty: Path) -> Kwargs:
    return {"data_dir": str(empty), "train_file": "train.npz", "test_file": "test.npz"}


def _csv(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    rows = []
    for label in ("cat", "dog", "fox"):
        for i in range(5):
            _image(root / "img" / f"{label}{i}.png")
            rows.append(f"img/{label}{i}.png,{label}")
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return {"csv_file": str(root / "list.csv")}


def _text_csv(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    texts = {"pos": ["the movie was very good !", "great fun", "good acting , good plot", "a great film", "fun"],
             "neg": ["the plot is bad", "awful acting", "not good . not fun", "a bad , bad movie", "very awful"]}
    rows = [f'"{t}",{label}' for label, items in texts.items() for t in items]
    (root / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return {"csv_file": str(root / "reviews.csv")}


def _image_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    _class_folders(root / "set" / "train", ["ant", "bee", "wasp"], 5)
    return {"root": str(root / "set")}


def _digit_domains(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    write_mnist(root / "mnist", n_train=40, n_test=20)  # 4 training images per digit, 1 held out for validation
    write_usps_esl(root / "usps", n=20)
    return {"source": "mnist", "target": "usps", "root": str(root)}


def _domains(name: str, classes: int, domain: str) -> Case:
    def write(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
        names = [f"class{i:03d}" for i in range(classes)]  # the release's class count: fewer is an error
        folder = root / DATAMODULES.get(name).folder
        for cname in names:
            for i in range(4):
                _image(folder / domain / cname / f"{domain}_{i}.png")
        return {"source": domain, "data_dir": str(root)}

    return Case(write, lambda empty: {"source": domain, "data_dir": str(empty)})


def _imagenet_c(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    write_imagenet_c(root / "ImageNet-C", [("fog", 1)], per_class=2)
    wnids = sorted(p.name for p in (root / "ImageNet-C" / "fog" / "1").iterdir())
    _class_folders(root / "clean", wnids, 5, ".JPEG")
    return {"corruptions": ["fog"], "severities": [1], "clean_dir": str(root / "clean"), "data_dir": str(root)}


def _vtab(root: Path, monkeypatch: pytest.MonkeyPatch) -> Kwargs:
    write_vtab_task(root / "dtd")  # final mode: 9 training images, 3 per class
    return {"task": "dtd", "root": str(root / "dtd")}


def _class_subset(cls: type, kwargs: Kwargs) -> TransferDataModule:
    return cls(NpzImages(**kwargs), subset="base")  # the inner datamodule takes the counts, as in a config


def _paired(cls: type, kwargs: Kwargs) -> TransferDataModule:
    # two draws of one tiny dataset as source and target (same classes); the counts go to both, as in a config
    return cls(NpzImages(**kwargs), NpzImages(**{**kwargs, "seed": kwargs.get("seed", 1) + 1}))


CASES: dict[str, Case] = {
    **{name: _coop(name) for name in ("caltech101", "dtd", "eurosat", "flowers102", "food101", "oxford_pets",
                                      "stanford_cars", "sun397", "ucf101")},
    "fgvc_aircraft": Case(_fgvc, lambda empty: {"data_dir": str(empty)}),
    "imagenet": Case(_imagenet, lambda empty: {"data_dir": str(empty)}),
    "cifar10": Case(_cifar("CIFAR10"), lambda empty: {"data_dir": str(empty)}),
    "cifar100": Case(_cifar("CIFAR100"), lambda empty: {"data_dir": str(empty)}),
    "class_subset": Case(_npz, _npz_missing, build=_class_subset),
    "csv": Case(_csv, lambda empty: {"csv_file": str(empty / "list.csv")}),
    "digit_domains": Case(_digit_domains, lambda empty: {"source": "mnist", "target": "usps", "root": str(empty)}),
    "digits": Case(lambda root, mp: {"task": "target"}, None,
                   nothing_missing="scikit-learn embeds the digits: there is nothing to download"),
    "domainnet": _domains("domainnet", 345, "clipart"),
    "office31": _domains("office31", 31, "amazon"),
    "office_home": _domains("office_home", 65, "Art"),
    "pacs": _domains("pacs", 7, "photo"),
    "image_folder": Case(_image_folder, lambda empty: {"root": str(empty)}),
    "imagenet_c": Case(_imagenet_c, lambda empty: {"corruptions": ["fog"], "severities": [1], "data_dir": str(empty)},
                       missing_stage="test"),
    "npz_images": Case(_npz, _npz_missing),
    "paired_domains": Case(_npz, _npz_missing, build=_paired),
    "text_csv": Case(_text_csv, lambda empty: {"csv_file": str(empty / "reviews.csv")},
                     data_config=lambda: {"modality": "text", "tokenizer": tiny_bert_text_dir(), "max_length": 16}),
    "vtab": Case(_vtab, lambda empty: {"task": "dtd", "root": str(empty / "dtd")}),
}


# ---- the CLI's view -------------------------------------------------------------------------------------------
class Option(NamedTuple):
    required: bool
    default: Any
    help: str


def cli_options(cls: type) -> dict[str, Option]:
    """The options of ``cls`` as LightningCLI lists them under ``--data.init_args.*``.

    jsonargparse follows ``**kwargs`` forwarded by ``super().__init__(**kwargs)`` into the base classes (and drops
    what the call fixes), so this is the real option list, which ``inspect.signature`` would not give.
    """
    parser = LightningArgumentParser()
    parser.add_class_arguments(cls, "data")
    return {action.dest[len("data."):]: Option(bool(action.required), action.default, action.help or "")
            for action in parser._actions  # argparse's list of what it parses
            if isinstance(action.dest, str) and action.dest.startswith("data.")
            and "." not in action.dest[len("data."):]}  # not a nested one (ClassSubset's data.help, ...)
