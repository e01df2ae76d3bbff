"""The strategy comparison runner: rows per (strategy, seed), errors recorded, resume, table and plot."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lightning_transfer.bench import aggregate, main
from tests.conftest import REPO


def test_aggregate_mean_and_sample_std_over_finished_seeds():
    rows = [
        {"strategy": "a", "status": "ok", "top1": 0.5, "trainable_params": 10, "saved_for_backward_mb": 2.0},
        {"strategy": "a", "status": "ok", "top1": 0.7, "trainable_params": 10, "saved_for_backward_mb": 4.0},
        {"strategy": "a", "status": "error", "error": "boom"},
        {"strategy": "b", "status": "error", "error": "ValueError: bad"},
    ]
    a, b = aggregate(rows, ["a", "b"])
    assert a["seeds"] == 2 and a["top1_mean"] == pytest.approx(0.6)
    assert a["top1_std"] == pytest.approx(math.sqrt(0.02)) and a["saved_for_backward_mb"] == 3.0
    assert a["error"] == "boom" and b["seeds"] == 0 and b["top1_mean"] is None and b["error"] == "ValueError: bad"


def test_unknown_strategy_fails_before_running(tmp_path):
    with pytest.raises(SystemExit, match="unknown adaptation strategy 'lorax'"):
        main(["--config", str(REPO / "configs/quickstart.yaml"), "--strategies", "lorax", "--output", str(tmp_path)])


def test_bench_runs_records_errors_and_resumes(tmp_path, capsys):
    strategy_dir = tmp_path / "strategies"
    strategy_dir.mkdir()
    (strategy_dir / "linear_probe.yaml").write_text((REPO / "configs/strategy/linear_probe.yaml").read_text())
    # a config that fails at construction: its row records the error, the other rows are unaffected
    (strategy_dir / "partial_freeze.yaml").write_text(
        "model:\n  adaptation:\n    class_path: PartialFreeze\n    init_args: {num_frozen_blocks: 99}\n")
    out = tmp_path / "out"
    argv = ["--config", str(REPO / "configs/quickstart.yaml"), "--strategies", "linear_probe,partial_freeze",
            "--seeds", "1", "--output", str(out), "--strategy-configs", str(strategy_dir), "--no-wandb", "--",
            "--trainer.max_epochs=2", "--trainer.limit_val_batches=1"]
    main(argv)
    with open(out / "results.csv") as f:
        table = {r["strategy"]: r for r in csv.DictReader(f)}
    assert table["linear_probe"]["seeds"] == "1" and 0 <= float(table["linear_probe"]["top1_mean"]) <= 1
    assert float(table["linear_probe"]["trainable_params"]) == 64 * 5 + 5
    assert float(table["linear_probe"]["checkpoint_mb"]) < 0.1
    assert "num_frozen_blocks=99 is out of range" in table["partial_freeze"]["error"]
    row = json.loads((out / "rows" / "linear_probe_seed1.json").read_text())
    assert row["versions"]["torch"] and "LinearProbe" in row["config"] and "git_commit" in row
    assert (out / "pareto.png").stat().st_size > 0 and "| linear_probe |" in (out / "results.md").read_text()
    capsys.readouterr()
    argv[argv.index("linear_probe,partial_freeze")] = "linear_probe"
    main(argv)  # rerun with the same output: the finished row is skipped (a failed one would be tried again)
    assert "linear_probe seed 1 done before, skipped" in capsys.readouterr().out


TTA_BASE = """\
trainer: {max_epochs: 1, accelerator: cpu, logger: false, enable_checkpointing: false}
model:
  backbone: {class_path: lightning_transfer.backbones.cifar_resnet.CIFARResNet20}
  adaptation: {class_path: LinearProbe}
data:
  class_path: lightning_transfer.datamodules.corruption.NpzImages
  init_args: {data_dir: DATA, train_file: train.npz, test_file: test.npz, corruptions: [gaussian_noise, fog],
              severities: [1], batch_size: 20, val_fraction: 0.2}
"""


def test_bench_test_time_methods_error_per_corruption(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 20)):
        np.savez(tmp_path / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10)
    base = tmp_path / "tta.yaml"
    base.write_text(TTA_BASE.replace("DATA", str(tmp_path)))
    out = tmp_path / "out"
    argv = ["--config", str(base), "--test-time", "bn_adapt,tent", "--seeds", "1", "--output", str(out),
            "--test-time-configs", str(REPO / "configs/test_time"), "--no-wandb"]
    with pytest.raises(SystemExit, match="unknown test-time method 'tentt'"):
        main([*argv[:3], "tentt", *argv[4:]])
    main(argv)
    with open(out / "results_tta.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert list(table) == ["source", "bn_adapt", "tent"]
    for row in table.values():
        assert row["error"] == "" and row["seeds"] == "1", row
        errors = [float(row["gaussian_noise-1"]), float(row["fog-1"])]
        assert all(0 <= e <= 1 for e in errors) and float(row["mean_error"]) == pytest.approx(sum(errors) / 2)
    source = json.loads((out / "rows" / "tta_source_seed1.json").read_text())
    tent = json.loads((out / "rows" / "tta_tent_seed1.json").read_text())
    assert source["source_checkpoint"].endswith("source.ckpt") and "Tent" in tent["config"]
    assert "Tent" not in source["config"]
    capsys.readouterr()
    main(argv)
    assert "tent seed 1 done before, skipped" in capsys.readouterr().out


def test_tables_can_omit_accuracy_for_random_weight_runs(tmp_path):
    from lightning_transfer.bench import write_tables

    table = aggregate([{"strategy": "a", "status": "ok", "top1": 0.1, "trainable_params": 5,
                        "saved_for_backward_mb": 3.0}], ["a"])
    write_tables(table, tmp_path, omit_accuracy=True)
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "top1" not in header and "saved_for_backward_mb" in header
    assert "top1" not in (tmp_path / "results.md").read_text()
    write_tables(table, tmp_path)
    assert "top1_mean" in (tmp_path / "results.csv").read_text()


def test_inference_timing_respects_an_integer_test_batch_limit():
    from types import SimpleNamespace

    from lightning_transfer.bench import _test_batch_budget

    assert _test_batch_budget(SimpleNamespace(limit_test_batches=4)) == 4
    assert _test_batch_budget(SimpleNamespace(limit_test_batches=1)) == 2  # one warm-up batch + one timed
    assert _test_batch_budget(SimpleNamespace(limit_test_batches=1.0)) == 20  # a fraction: the default
    assert _test_batch_budget(SimpleNamespace(limit_test_batches=500)) == 20
