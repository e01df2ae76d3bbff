"""``predict`` writes its predictions: a CSV and the probabilities, in a new folder each time."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from lightning_transfer.callbacks.predictions import new_folder
from lightning_transfer.cli import TransferCLI
from tests.conftest import REPO

QUICK = str(REPO / "configs" / "quickstart.yaml")


def test_predict_writes_a_csv_and_the_probabilities_and_never_overwrites(tmp_path):
    where = ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    TransferCLI(args=["fit", "--config", QUICK, *where, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                      "--trainer.limit_val_batches=1"])
    predict = ["predict", "--config", QUICK, *where, "--ckpt_path", "last", "--trainer.limit_predict_batches=2"]
    cli = TransferCLI(args=predict)
    folder = tmp_path / "predictions"
    with open(folder / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    probs = load_file(str(folder / "probabilities.safetensors"))["probabilities"]
    batch = cli.datamodule.batch_size
    assert len(rows) == probs.shape[0] == 2 * batch and probs.shape[1] == cli.model.num_classes
    assert torch.allclose(probs.sum(1), torch.ones(len(rows)), atol=1e-5)
    names = cli.datamodule.class_names
    for row, p in zip(rows, probs):
        assert int(row["predicted"]) == int(p.argmax()) and row["class_name"] == names[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=1e-6)
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    TransferCLI(args=predict)  # again: a new folder, the first one kept as it was
    assert (tmp_path / "predictions-1" / "predictions.csv").is_file()
    assert (folder / "predictions.csv").read_text().count("\n") == len(rows) + 1


def test_new_folder_numbers_past_existing_ones(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p-1").mkdir()
    assert new_folder(tmp_path / "p") == tmp_path / "p-2"


def test_an_output_dir_that_holds_files_is_refused_before_predicting(tmp_path):
    from types import SimpleNamespace

    from lightning_transfer.callbacks.predictions import PredictionWriter

    (tmp_path / "kept.csv").write_text("a user's file\n")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        PredictionWriter(output_dir=str(tmp_path)).setup(SimpleNamespace(), None, "predict")
    assert (tmp_path / "kept.csv").read_text() == "a user's file\n"


def test_rows_carry_the_split_positions_lightning_reports(tmp_path):
    # under DDP each process predicts its own share: the positions, not the row numbers, say which images
    from types import SimpleNamespace

    from lightning_transfer.callbacks.predictions import PredictionWriter

    writer = PredictionWriter(output_dir=str(tmp_path / "out"))
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(broadcast=lambda x: x), world_size=1,
                              global_rank=0, datamodule=None)
    module = SimpleNamespace(hparams={"class_names": ["cat", "dog"]})
    writer.write_on_epoch_end(trainer, module, [torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.6, 0.4]])],
                              [[7, 3], [5]])
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = [(r["index"], r["class_name"]) for r in csv.DictReader(f)]
    assert rows == [("7", "cat"), ("3", "dog"), ("5", "cat")]
