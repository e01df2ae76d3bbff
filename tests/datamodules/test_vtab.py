"""VTAB-1k: the prepared-list layout, tune/final modes, the direct resize (cached or not), errors and the means."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from PIL import Image

from lightning_transfer.datamodules.vtab import VTAB_GROUPS, VTAB_TASKS, VTAB1k, vtab_means, vtab_task
from lightning_transfer.module import TransferModule
from tests.helpers.models import tiny_cnn

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_pct": 0.875,
       "interpolation": "bicubic"}
LISTS = {"train800": 6, "val200": 3, "test": 4}  # images per list in the fixture (labels cycle over 3 classes)


def write_vtab_task(root, lists=LISTS, size=(30, 20)):
    """A task folder in the prepared layout: images/<list>/<i>.jpg and the four ``path label`` lists."""
    rng = np.random.default_rng(0)
    lines = {}
    for name, count in lists.items():
        (root / "images" / name).mkdir(parents=True)
        lines[name] = []
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / name / f"{i}.jpg")
            lines[name].append(f"images/{name}/{i}.jpg {i % 3}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for name, rows in lines.items():
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return root


class _Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.params = {}

    name, version = "recorder", 0

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        pass


def _names(samples):
    return [p.rsplit("images/", 1)[1] for p, _ in samples]


def test_tune_and_final_modes_read_their_lists(tmp_path):
    root = write_vtab_task(tmp_path / "dtd")
    tune = VTAB1k("dtd", mode="tune", root=str(root), data_config=CFG)
    tune.setup()
    assert _names(tune.samples["train"]) == [f"train800/{i}.jpg" for i in range(6)]
    assert _names(tune.samples["val"]) == _names(tune.samples["test"]) == [f"val200/{i}.jpg" for i in range(3)]
    final = VTAB1k("dtd", mode="final", root=str(root), data_config=CFG)
    final.setup()
    assert len(final.samples["train"]) == 9 and _names(final.samples["test"]) == [f"test/{i}.jpg" for i in range(4)]
    assert final.datasets["test"] is final.datasets["val"]
    assert final.num_classes == 47 and [y for _, y in final.samples["test"]] == [0, 1, 2, 0]
    assert not final.augment  # the VTAB protocol trains without augmentation


def test_variant_and_digest_are_logged_and_tell_runs_apart(tmp_path):
    root = write_vtab_task(tmp_path / "cifar")
    infos = {}
    for key, kwargs in {"a": {}, "b": {}, "tune": {"mode": "tune"}, "crop": {"resize": "crop"}}.items():
        dm = VTAB1k("cifar100", root=str(root), data_config=CFG, **kwargs)
        recorder = _Recorder()
        dm.trainer = SimpleNamespace(loggers=[recorder])
        dm.setup()
        infos[key] = recorder.params
    assert infos["a"]["data/variant"] == "vtab1k/cifar/final/direct16x16/bicubic"
    assert infos["crop"]["data/variant"] == "vtab1k/cifar/final/crop16x16/bicubic"
    assert infos["a"]["data/split_digest"] == infos["b"]["data/split_digest"]
    assert infos["a"]["data/split_digest"] != infos["tune"]["data/split_digest"]
    assert infos["a"]["data/num_train"] == 9 and infos["a"]["data/num_test"] == 4
    first = root / "images" / "train800" / "0.jpg"
    Image.open(first).save(first, quality=50)  # the same lists over differently prepared images
    again = VTAB1k("cifar", root=str(root), data_config=CFG)
    again.setup()
    assert again.split_info()["data/split_digest"] == infos["a"]["data/split_digest"]
    assert again.split_info()["data/content_digest"] != infos["a"]["data/content_digest"]


def test_direct_resize_without_crop_and_the_cache_agree(tmp_path):
    root = write_vtab_task(tmp_path / "kitti", size=(40, 16))  # wide images: a crop would cut the sides off
    plain = VTAB1k("kitti", root=str(root), data_config=CFG)
    cached = VTAB1k("kitti", root=str(root), data_config=CFG, cache_images=True)
    plain.setup()
    cached.setup()
    image = Image.open(plain.samples["train"][0][0]).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
    expected = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
                - torch.tensor(CFG["mean"]).view(3, 1, 1)) / torch.tensor(CFG["std"]).view(3, 1, 1)
    for split in ("train", "test"):  # no augmentation: training images are preprocessed like the test images
        for i in range(3):
            x, y = plain.datasets[split][i]
            assert x.shape == (3, 16, 16)
            assert torch.allclose(x, cached.datasets[split][i][0], atol=1e-5) and int(cached.datasets[split][i][1]) == y
    assert torch.allclose(plain.datasets["train"][0][0], expected, atol=0.05)  # PIL vs torchvision bicubic rounding
    crop = VTAB1k("kitti", root=str(root), data_config=CFG, resize="crop")
    crop.setup()
    assert not torch.allclose(crop.datasets["train"][0][0], plain.datasets["train"][0][0], atol=0.1)


def test_missing_task_says_where_and_how(tmp_path):
    dm = VTAB1k("eurosat", data_dir=str(tmp_path / "data"), data_config=CFG)  # the constructor reads nothing
    with pytest.raises(FileNotFoundError, match=r"vtab-1k/eurosat/train800val200\.txt.*NOAH"):
        dm.setup()


def test_bad_lines_and_labels_name_the_file(tmp_path):
    root = write_vtab_task(tmp_path / "svhn")
    (root / "test.txt").write_text("images/test/0.jpg 1\nimages/test/1.jpg\n")
    with pytest.raises(ValueError, match=r"test\.txt:2: expected"):
        VTAB1k("svhn", root=str(root), data_config=CFG).setup()
    (root / "test.txt").write_text("images/test/0.jpg 1\nimages/test/1.jpg 10\n")
    with pytest.raises(ValueError, match=r"label 10 of .*images/test/1\.jpg.* outside the 10 classes"):
        VTAB1k("svhn", root=str(root), data_config=CFG).setup()


def test_task_names_and_arguments_are_validated():
    assert len(VTAB_TASKS) == 19 and [len(g) for g in VTAB_GROUPS.values()] == [7, 4, 8]
    assert vtab_task("Oxford-IIIT-Pet") == "oxford_iiit_pet" and vtab_task("dsprites-orientation") == "dsprites_ori"
    with pytest.raises(ValueError, match="the 19 tasks are: cifar, caltech101"):
        VTAB1k("imagenet")
    with pytest.raises(ValueError, match="mode must be"):
        VTAB1k("dtd", mode="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has 4 classes"):
        VTAB1k("kitti", class_names=["a", "b"])


def test_means_against_a_direct_computation():
    rng = np.random.default_rng(0)
    results = {task: float(rng.uniform(20, 95)) for task in VTAB_TASKS}
    out = vtab_means({**{k: v for k, v in results.items() if k != "cifar"}, "cifar100": results["cifar"]})
    natural = np.mean([results[t] for t in ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet",
                                           "svhn", "sun397")])
    specialized = np.mean([results[t] for t in ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")])
    structured = np.mean([results[t] for t in ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
                                              "dsprites_ori", "smallnorb_azi", "smallnorb_ele")])
    assert out["natural"] == pytest.approx(natural) and out["structured"] == pytest.approx(structured)
    assert out["group_mean"] == pytest.approx((natural + specialized + structured) / 3)
    assert out["task_mean"] == pytest.approx(np.mean(list(results.values())))
    del results["dmlab"], results["kitti"]
    with pytest.raises(ValueError, match="missing 2: dmlab, kitti"):
        vtab_means(results)
    with pytest.raises(ValueError, match="given twice"):
        vtab_means({**results, "dmlab": 1.0, "kitti": 1.0, "cifar100": 1.0})


def test_fit_takes_the_backbone_preprocessing_and_logs_the_split(tmp_path):
    root = write_vtab_task(tmp_path / "dmlab")
    dm = VTAB1k("dmlab", root=str(root), batch_size=4, cache_images=True)
    module = TransferModule(tiny_cnn(), num_classes=dm.num_classes, class_names=dm.class_names)
    recorder = _Recorder()
    trainer = Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                      logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")  # fast_dev_run would replace the logger
    trainer.fit(module, dm)
    assert dm.datasets["train"].images.shape[-2:] == (32, 32)  # the tiny CNN's input size
    assert recorder.params["data/variant"].startswith("vtab1k/dmlab/final/direct32x32/")
    assert len(recorder.params["data/split_digest"]) == 16


def test_listed_image_missing_on_disk_fails_in_setup_naming_the_lists(tmp_path):
    root = write_vtab_task(tmp_path / "dtd")
    (root / "images" / "val200" / "1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 9 images listed in .*train800\.txt, .*val200\.txt are missing "
                                                r"on disk: .*val200/1\.jpg"):
        VTAB1k("dtd", mode="tune", root=str(root), data_config=CFG).setup()


def _rewrite(root, name, rows):
    (root / f"{name}.txt").write_text("\n".join(rows) + "\n")


def test_lists_that_overlap_or_do_not_add_up_are_errors_and_odd_sizes_a_warning(tmp_path):
    root = write_vtab_task(tmp_path / "dtd")
    with pytest.warns(UserWarning, match=r"train800\.txt has 6 images, val200\.txt 3 and train800val200\.txt 9; "
                                         r"VTAB-1k's lists have 800, 200 and 1000"):
        VTAB1k(task="dtd", root=str(root), data_config=CFG).load_samples()
    train = (root / "train800.txt").read_text().splitlines()
    val = (root / "val200.txt").read_text().splitlines()
    _rewrite(root, "val200", val[:2] + [train[0]])  # a training image also in validation
    _rewrite(root, "train800val200", train + val[:2] + [train[0]])
    for mode in ("tune", "final"):
        with pytest.raises(ValueError, match=r"train800\.txt and val200\.txt share 1 image\(s\), e\.g\. "
                                             r"'images/train800/0\.jpg'.*re-prepare"):
            VTAB1k(task="dtd", mode=mode, root=str(root), data_config=CFG).load_samples()
    _rewrite(root, "val200", val)
    _rewrite(root, "train800val200", train + val[:2] + ["images/test/0.jpg 0"])  # a test image in place of one
    with pytest.raises(ValueError, match=r"train800val200\.txt is not train800\.txt \+ val200\.txt, e\.g\. "
                                         r"'images/(test/0|val200/2)\.jpg'"):
        VTAB1k(task="dtd", mode="final", root=str(root), data_config=CFG).load_samples()
