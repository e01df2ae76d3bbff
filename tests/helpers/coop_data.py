"""A CoOp-layout Oxford Pets fixture (images + split_zhou_OxfordPets.json), shared by datamodule and recipe tests."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

PETS = ["Abyssinian", "american_bulldog", "beagle"]  # image-id prefixes, as in the Oxford-IIIT Pet release


def write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)


def coop_pets(data_dir, counts=(6, 3, 3), image_folder="oxford_pets/images"):
    """CoOp's Oxford Pets: images/<Breed>_<n>.jpg and split_zhou_OxfordPets.json (class names lower case)."""
    split, n = {}, 0
    for name, count in zip(("train", "val", "test"), counts):
        split[name] = []
        for label, breed in enumerate(PETS):
            for _ in range(count):
                n += 1
                write_image(data_dir / image_folder / f"{breed}_{n}.jpg", n)
                split[name].append([f"{breed}_{n}.jpg", label, breed.lower()])
    (data_dir / "oxford_pets").mkdir(parents=True, exist_ok=True)
    (data_dir / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return split
