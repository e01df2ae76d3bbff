"""VTAB-1k (Zhai et al., arXiv 1910.04867) in the prepared-image layout of the PETL repositories, and its means.

Each task folder holds ``images/...`` and four lists with one ``<relative path> <label>`` per line:
``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``. This is the layout NOAH, VPT, SSF,
GLoRA and most parameter-efficient transfer papers share; the task folders carry the names in :data:`VTAB_TASKS`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from lightning_transfer.datamodules.files import FileListDataModule, Sample, read_split_list
from lightning_transfer.registry import register_datamodule

# task folder name -> number of classes, grouped as in the VTAB paper
VTAB_GROUPS: dict[str, dict[str, int]] = {
    "natural": {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                "svhn": 10, "sun397": 397},
    "specialized": {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5},
    "structured": {"clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
                   "smallnorb_azi": 18, "smallnorb_ele": 9},
}
VTAB_TASKS: dict[str, int] = {task: n for group in VTAB_GROUPS.values() for task, n in group.items()}
# other spellings found in papers and configs -> the folder name
VTAB_ALIASES: dict[str, str] = {
    "cifar100": "cifar", "cifar_100": "cifar", "caltech_101": "caltech101", "flowers102": "oxford_flowers102",
    "pets": "oxford_iiit_pet", "pet": "oxford_iiit_pet", "camelyon": "patch_camelyon", "retinopathy":
    "diabetic_retinopathy", "clevr_distance": "clevr_dist", "dsprites_location": "dsprites_loc", "dsprites_position":
    "dsprites_loc", "dsprites_orientation": "dsprites_ori", "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele", "kitti_distance": "kitti",
}
_LISTS = {"tune": ("train800.txt", "val200.txt"), "final": ("train800val200.txt", "test.txt")}
_SIZES = {"train800.txt": 800, "val200.txt": 200, "train800val200.txt": 1000}


def check_vtab_lists(lists: dict[str, list[Sample]]) -> None:
    """train800 and val200 must be disjoint and train800val200 their union (else tune-mode numbers leak or final
    mode trains on other images); sizes other than 800 / 200 / 1,000 are a warning (tiny test fixtures have them).

    ``lists`` maps the list file names of :data:`_SIZES` to their (path, label) samples; a missing one skips the check.
    """
    from lightning.pytorch.utilities import rank_zero_warn

    if set(lists) != set(_SIZES):
        return
    train, val, union = (lists[name] for name in _SIZES)
    shared = sorted({p for p, _ in train} & {p for p, _ in val})
    if shared:
        raise ValueError(f"VTAB-1k lists train800.txt and val200.txt share {len(shared)} image(s), e.g. "
                         f"{_relative(shared[0])!r}: tune-mode validation would score training images; re-prepare "
                         "the task's lists (they must be disjoint)")
    odd = sorted(set(union) ^ set(train + val))
    if odd or len(union) != len(train) + len(val):
        example = f", e.g. {_relative(odd[0][0])!r} is in one and not the other" if odd else " (repeated lines)"
        raise ValueError(f"VTAB-1k list train800val200.txt is not train800.txt + val200.txt{example}: re-prepare the "
                         "task's lists so that train800val200.txt holds exactly the lines of the two")
    sizes = [len(lists[name]) for name in _SIZES]
    if sizes != list(_SIZES.values()):
        rank_zero_warn(f"VTAB-1k lists train800.txt has {sizes[0]} images, val200.txt {sizes[1]} and "
                       f"train800val200.txt {sizes[2]}; VTAB-1k's lists have 800, 200 and 1000: numbers from this "
                       "preparation are not comparable with published ones")


def _relative(path: str) -> str:
    """``.../images/x.jpg`` -> ``images/x.jpg`` for messages (the prepared layout keeps images under images/)."""
    return "images/" + path.rsplit("/images/", 1)[1] if "/images/" in path else path


def vtab_task(name: str) -> str:
    """The task's folder name for ``name`` (folder name or a common alias; case, '-' and '_' are ignored)."""
    key = name.strip().lower().replace("-", "_")
    key = VTAB_ALIASES.get(key, key)
    if key not in VTAB_TASKS:
        raise ValueError(f"unknown VTAB-1k task {name!r}; the 19 tasks are: {', '.join(VTAB_TASKS)}")
    return key


def vtab_means(results: dict[str, float]) -> dict[str, float]:
    """Per-group means, the mean of the three group means and the mean over the 19 tasks.

    Papers report either of the last two as "VTAB-1k mean"; they differ because the groups have 7, 4 and 8 tasks.
    Every task must be present (a mean over fewer tasks is not comparable); aliases are accepted.
    """
    scores: dict[str, float] = {}
    for name, value in results.items():
        task = vtab_task(name)
        if task in scores:
            raise ValueError(f"task {task!r} is given twice in the VTAB-1k results (as {name!r} and another alias)")
        scores[task] = float(value)
    missing = [t for t in VTAB_TASKS if t not in scores]
    if missing:
        raise ValueError(f"VTAB-1k means need all 19 tasks; missing {len(missing)}: {', '.join(missing)}")
    out = {group: sum(scores[t] for t in tasks) / len(tasks) for group, tasks in VTAB_GROUPS.items()}
    out["group_mean"] = sum(out[g] for g in VTAB_GROUPS) / len(VTAB_GROUPS)
    out["task_mean"] = sum(scores.values()) / len(scores)
    return out


@register_datamodule("vtab")
class VTAB1k(FileListDataModule):
    """One VTAB-1k task: 800 training + 200 validation images, tested on the full test split.

    ``mode="tune"`` trains on ``train800`` and validates and tests on ``val200`` (hyper-parameter search);
    ``mode="final"`` trains on all 1,000 (``train800val200``) and validates and tests on ``test``: the reported
    number. In the final mode the validation loader is the test set, for monitoring only, never for selection.

    Preprocessing follows the PETL repositories: no augmentation, images resized straight to the input size
    (224x224 for ViT-B/16, no aspect-preserving resize, no crop) with the backbone's interpolation and
    normalisation. ``resize="crop"`` uses timm's resize + centre crop instead; for the square images of most tasks
    the two agree, but not for the rectangular ones (KITTI, SUN397, ...). How the images were prepared matters too:
    two preparations of VTAB-1k differ by about 10 points on CIFAR-100. So the logged ``data/variant`` names task,
    mode, resize, size and interpolation, ``data/split_digest`` hashes the lists (paths and labels) and
    ``data/content_digest`` the bytes of the first training images, which differ between preparations.

    Args:
        task: one of the 19 task folder names (:data:`VTAB_TASKS`) or an alias (``cifar100``, ``pets``, ...).
        mode: ``tune`` (train800 -> val200) or ``final`` (train800val200 -> test).
        root: the task folder; default ``<data_dir>/vtab-1k/<task>``.
        resize: ``direct`` (resize to the input size, the PETL default) or ``crop`` (timm's resize + centre crop).
        augment: timm's training augmentation (off in the VTAB protocol).
        cache_images: decode and resize every split once into memory: 150 MB per 1,000 images at 224x224, so cheap
            in the tune mode; in the final mode the test split is cached too (tens of thousands of images for some
            tasks).
        class_names: names of the classes (default ``"0"``, ``"1"``, ...; the prepared lists carry only indices).
        batch_size: batch size of every loader.
        **kwargs: see :class:`~lightning_transfer.datamodules.files.FileListDataModule`.
    """

    def __init__(
        self,
        task: str,
        mode: Literal["tune", "final"] = "final",
        root: str | None = None,
        resize: Literal["direct", "crop"] = "direct",
        augment: bool = False,
        cache_images: bool = False,
        class_names: list[str] | None = None,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        # every mode has a validation list: no hold-out, so no val_fraction option
        super().__init__(augment=augment, cache_images=cache_images, val_fraction=0.1, batch_size=batch_size,
                         **kwargs)
        self.task_name = vtab_task(task)
        if mode not in _LISTS:
            raise ValueError(f"mode must be 'tune' (train800 -> val200) or 'final' (train800val200 -> test), "
                             f"got {mode!r}")
        if resize not in ("direct", "crop"):
            raise ValueError(f"resize must be 'direct' or 'crop', got {resize!r}")
        n = VTAB_TASKS[self.task_name]
        if class_names is not None and len(class_names) != n:
            raise ValueError(f"VTAB-1k {self.task_name} has {n} classes; got {len(class_names)} class_names")
        self.mode, self.resize = mode, resize
        self.direct_resize = resize == "direct"
        self.root = Path(root).expanduser() if root else self.data_dir / "vtab-1k" / self.task_name
        self._class_names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        self.class_names_generated = class_names is None  # the prepared lists carry only indices

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    def load_samples(self) -> dict[str, list[Sample]]:
        train_list, eval_list = (self.root / name for name in _LISTS[self.mode])
        for path in (train_list, eval_list):
            if not path.is_file():
                raise FileNotFoundError(
                    f"VTAB-1k task {self.task_name!r} not found: no {path}. Prepare VTAB-1k in the PETL layout "
                    f"(e.g. the preparation script of NOAH, github.com/ZhangYuanhan-AI/NOAH) so that "
                    f"{self.root} holds images/ and train800.txt, val200.txt, train800val200.txt, test.txt; "
                    "or set data.init_args.root to the task folder"
                )
        cfg = self.data_config()
        _, h, w = cfg["input_size"]
        self.variant = (f"vtab1k/{self.task_name}/{self.mode}/{self.resize}{h}x{w}/"
                        f"{cfg.get('interpolation', 'bilinear')}{'/augment' if self.augment else ''}")
        self.listed_in = f"{train_list}, {eval_list}"
        lists = {name: read_split_list(self.root / name, self.root) for name in _SIZES if (self.root / name).is_file()}
        check_vtab_lists(lists)
        evaluation = lists.get(eval_list.name) or read_split_list(eval_list, self.root)
        train = lists.get(train_list.name) or read_split_list(train_list, self.root)
        return {"train": train, "val": evaluation, "test": evaluation}

    def split_info(self) -> dict[str, Any]:
        """The base's split hash and variant, plus a hash of the first 8 training files' bytes (cheap to read)."""
        if not self.samples:
            return {}
        content = hashlib.sha256()
        for path, _ in self.samples["train"][:8]:
            content.update(Path(path).read_bytes())
        return {**super().split_info(), "data/content_digest": content.hexdigest()[:16]}
