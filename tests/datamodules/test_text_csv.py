"""TextCSV: texts tokenised with the backbone's tokenizer, padded per batch, and a text backbone fit from the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from lightning_transfer.backbones.hf_text import HFTextBackbone
from lightning_transfer.cli import TransferCLI
from lightning_transfer.datamodules.text_csv import TextCSV
from tests.conftest import REPO
from tests.helpers.text_models import TINY_BERT, tiny_bert_text_dir

ROWS = [("the movie was very good !", "pos"), ("great fun", "pos"), ("good acting , good plot", "pos"),
        ("a great film", "pos"), ("fun", "pos"), ("the plot is bad", "neg"), ("awful acting", "neg"),
        ("not good . not fun", "neg"), ("a bad , bad movie", "neg"), ("very awful", "neg")]


def _csv(tmp_path, rows=ROWS, header="text,label", split=None) -> str:
    path = tmp_path / "reviews.csv"
    lines = [header] + [f'"{t}",{y}' + (f",{split(i)}" if split else "") for i, (t, y) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _module(csv_file: str, **kwargs) -> TextCSV:
    dm = TextCSV(csv_file=csv_file, batch_size=4, **kwargs)
    dm.set_data_config(HFTextBackbone(model_name_or_path=tiny_bert_text_dir()).data_config())
    return dm


def test_texts_are_tokenised_by_the_backbones_tokenizer_and_padded_per_batch(tmp_path):
    split = lambda i: "test" if i in (0, 9) else ("val" if i in (1, 8) else "train")  # noqa: E731
    dm = _module(_csv(tmp_path, header="text,label,split", split=split), split_column="split")
    dm.setup()
    assert dm.class_names == ["neg", "pos"] and not dm.class_names_generated
    assert [len(dm.datasets[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_text_dir())
    x, y = next(iter(dm.test_dataloader()))
    first, last = (tokenizer(ROWS[i][0])["input_ids"] for i in (0, 9))
    assert x.shape == (2, 2, len(first)) and y.tolist() == [1, 0]  # (B, ids+mask, the longer text's length)
    assert x[0, 0].tolist() == first and x[0, 1].tolist() == [1] * len(first)
    assert x[1, 0, :len(last)].tolist() == last and x[1, 0, len(last):].eq(tokenizer.pad_token_id).all()
    assert x[1, 1].tolist() == [1] * len(last) + [0] * (len(first) - len(last))
    backbone = HFTextBackbone(model_name_or_path=tiny_bert_text_dir()).eval()
    with torch.no_grad():  # the padded text gives what it gives alone
        torch.testing.assert_close(backbone(x)[1], backbone(torch.tensor([last]))[0], atol=1e-5, rtol=1e-5)


def test_k_shot_validation_split_and_truncation(tmp_path):
    dm = _module(_csv(tmp_path), num_shots=2, val_fraction=0.2, max_length=4)
    dm.setup()
    labels = [int(y) for _, y in dm.datasets["train"]]
    assert sorted(labels) == [0, 0, 1, 1] and len(dm.datasets["test"]) == 2  # 0.2 of each class held out, whole
    assert max(len(ids) for ids, _ in dm.datasets["train"]) <= 4
    assert dm.split_info()["data/num_train"] == 4


def test_bad_files_and_settings_fail_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"no column 'sentence' in the header \['text', 'label'\].*text_column"):
        _module(_csv(tmp_path), text_column="sentence").setup()
    mixed = _csv(tmp_path, rows=[("good", "pos"), ("bad", "1")])
    with pytest.raises(ValueError, match="mixes integer labels and class names"):
        _ = _module(mixed).class_names
    with pytest.raises(ValueError, match="label 'meh' is not one of the class_names"):
        _module(_csv(tmp_path, rows=[("good", "pos"), ("bad", "meh")]), class_names=["neg", "pos"]).setup()
    with pytest.raises(FileNotFoundError, match="CSV file .*missing.csv not found"):
        _module(str(tmp_path / "missing.csv")).setup()
    no_tokenizer = TextCSV(csv_file=_csv(tmp_path))
    no_tokenizer.set_data_config(HFTextBackbone(config=TINY_BERT).data_config())  # random init: no tokenizer named
    with pytest.raises(ValueError, match="names no tokenizer .* data.init_args.tokenizer"):
        no_tokenizer.setup()
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        TextCSV(csv_file="x.csv", max_length=1)


def _cli(tmp_path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/data/text_csv.yaml"),
            "--config", str(REPO / "configs/backbone/bert_base.yaml"),
            f"--model.backbone.init_args.model_name_or_path={tiny_bert_text_dir()}",
            f"--data.init_args.csv_file={_csv(tmp_path)}", "--data.init_args.batch_size=4",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'out'}", "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]


@pytest.mark.parametrize("strategy", ["LinearProbe", "LoRA"])
def test_a_text_backbone_fits_and_tests_from_the_command_line(tmp_path, strategy):
    cli = TransferCLI(args=["fit", *_cli(tmp_path, f"--model.adaptation={strategy}")])
    assert cli.trainer.state.finished and cli.model.num_classes == 2
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["train/loss"].item()))
    tested = TransferCLI(args=["test", *_cli(tmp_path, f"--model.adaptation={strategy}"),
                               f"--ckpt_path={cli.trainer.checkpoint_callback.best_model_path}"])
    assert 0.0 <= tested.trainer.callback_metrics["test/acc"].item() <= 1.0


def test_an_image_backbone_with_the_text_datamodule_is_refused_before_the_run(tmp_path):
    args = ["fit", *_cli(tmp_path), "--config", str(REPO / "configs/backbone/digits_vit.yaml")]
    with pytest.raises(ValueError, match=r"reads images .* but TextCSV yields token ids: choose a text backbone"):
        TransferCLI(args=args)
    assert not (tmp_path / "out").exists()
