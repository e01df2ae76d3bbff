"""The strategy comparison runner: rows per (strategy, seed), errors recorded, resume, table and plot."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lightning_transfer.bench import main
from lightning_transfer.bench.tables import aggregate
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


def test_a_variant_is_a_yaml_of_its_own_and_an_unknown_name_says_how_to_write_one(tmp_path):
    strategy_dir = tmp_path / "strategies"
    strategy_dir.mkdir()
    argv = ["--config", str(REPO / "configs/quickstart.yaml"), "--output", str(tmp_path / "out"),
            "--strategy-configs", str(strategy_dir), "--no-wandb", "--strategies"]
    with pytest.raises(SystemExit, match=r"unknown adaptation strategy 'lora_r16'.* write .*lora_r16\.yaml"):
        main([*argv, "lora_r16"])
    # the variant's YAML is what runs: its misspelt option is named under the variant's name before anything runs
    (strategy_dir / "lora_r16.yaml").write_text("model:\n  adaptation:\n    class_path: LoRA\n"
                                                "    init_args: {rank: 16}\n")
    with pytest.raises(SystemExit, match=r"(?s)lora_r16.*rank"):
        main([*argv, "lora_r16"])
    assert not list((tmp_path / "out").rglob("*.json"))  # no row ran


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
    with pytest.raises(SystemExit, match=r"1 of 2 runs failed \(partial_freeze seed 1\)"):  # a failure exits non-zero
        main(argv)
    with open(out / "results.csv") as f:
        table = {r["strategy"]: r for r in csv.DictReader(f)}
    assert table["linear_probe"]["seeds"] == "1" and 0 <= float(table["linear_probe"]["top1_mean"]) <= 1
    assert table["linear_probe"]["top1_std"] == ""  # one seed has no spread to report
    assert float(table["linear_probe"]["trainable_params"]) == 64 * 5 + 5
    assert float(table["linear_probe"]["checkpoint_mb"]) < 0.1
    # without the optimizer state: smaller, and only the number is kept
    assert 0 < float(table["linear_probe"]["weights_mb"]) < float(table["linear_probe"]["checkpoint_mb"])
    assert not list(out.rglob("weights_only.ckpt"))
    assert "num_frozen_blocks=99 is out of range" in table["partial_freeze"]["error"]
    row_path = out / "rows" / "linear_probe_seed1.json"
    row = json.loads(row_path.read_text())
    assert row["versions"]["torch"] and "LinearProbe" in row["config"] and "git_commit" in row
    assert (out / "pareto.png").stat().st_size > 0 and "| linear_probe |" in (out / "results.md").read_text()
    capsys.readouterr()
    only_probe = [*argv[:3], "linear_probe", *argv[4:]]
    main(only_probe)  # rerun with the same output: the finished row is skipped (a failed one would be tried again)
    assert "linear_probe seed 1 done before, skipped" in capsys.readouterr().out

    # nothing runs, and no row changes, when the settings are not those of the finished rows or do not parse
    saved = row_path.read_bytes()
    with pytest.raises(SystemExit, match=r"other settings(.|\n)*linear_probe_seed1.json: trainer.max_epochs: 2 -> 3"):
        main([*only_probe[:-2], "--trainer.max_epochs=3", only_probe[-1]])
    with pytest.raises(SystemExit, match="'linear_probe'.*does not parse.*max_epoches"):
        main([*only_probe, "--trainer.max_epoches=3"])
    with pytest.raises(SystemExit, match="lists 'linear_probe' more than once"):
        main([*argv[:3], "linear_probe, linear_probe", *argv[4:]])
    assert row_path.read_bytes() == saved and "bench: linear_probe seed 1 ..." not in capsys.readouterr().out

    # a table with no accuracy to plot removes the plot drawn from earlier rows; the other rows are kept and named
    with pytest.raises(SystemExit, match="1 of 1 runs failed"):
        main([*argv[:3], "partial_freeze", *argv[4:]])
    assert not (out / "pareto.png").exists() and row_path.read_bytes() == saved
    assert "rows/ also holds rows this command did not ask for (linear_probe_seed1.json)" in capsys.readouterr().out

    # a row cut short (a run killed while writing it, before writes were atomic) is set aside and the run done again
    row_path.write_text(saved.decode()[:100])
    main(only_probe)
    assert (out / "rows" / "linear_probe_seed1.json.unreadable").read_text() == saved.decode()[:100]
    assert json.loads(row_path.read_text())["status"] == "ok"


def test_bench_rejects_bad_arguments_before_running(tmp_path, capsys):
    base = ["--config", str(REPO / "configs/quickstart.yaml"), "--strategies", "linear_probe", "--no-wandb"]
    with pytest.raises(SystemExit):
        main([*base, "--seeds", "0", "--output", str(tmp_path / "out")])
    assert "--seeds: 0: at least 1 seed is needed" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main([*base, "--output", str(tmp_path / "a_file")])
    with pytest.raises(SystemExit, match="strategy config folder 'nowhere' does not exist.*--strategy-configs"):
        main([*base, "--output", str(tmp_path / "out"), "--strategy-configs", "nowhere"])
    assert (tmp_path / "a_file").read_text() == "kept" and not (tmp_path / "out").exists()


def test_a_stopped_runner_stops_its_worker(monkeypatch):
    """SIGTERM to the runner (a scheduler's kill) ends the worker too, rather than leaving it training."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from lightning_transfer.bench import runner

    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(runner, "_worker_command", lambda spec: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(runner.subprocess, "Popen", Recorded)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit) as stopped, runner._terminate_as_exit():
            runner._run_worker({})
    finally:
        timer.cancel()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert started and started[0].poll() is not None  # the worker was stopped, not left running
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the runner's handler is gone again


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
    main([*argv[:3], "tent", *argv[4:]])  # only tent: bn_adapt's finished rows are kept, and named
    printed = capsys.readouterr().out
    assert "tta_bn_adapt_seed1.json" in printed and "left out of this table" in printed
    # the same output with a given source checkpoint: the finished rows are of another source model
    with pytest.raises(SystemExit, match=r"tta_source_seed1.json: --ckpt_path: none -> .*source.ckpt \(\d+ bytes"):
        main([*argv, "--ckpt_path", source["source_checkpoint"]])
    with pytest.raises(SystemExit, match="lists 'tent' more than once"):
        main([*argv[:3], "tent,bn_adapt,tent", *argv[4:]])


def test_bench_test_time_source_row_runs_no_method_and_the_checkpoint_is_read_first(tmp_path):
    from lightning_transfer.bench import test_time
    from lightning_transfer.bench.config import resolved_config

    base = tmp_path / "tta.yaml"
    base.write_text(TTA_BASE.replace("DATA", str(tmp_path)))
    tent = str(REPO / "configs/test_time/tent.yaml")
    specs = test_time.jobs(["bn_adapt"], 1, [str(base), tent], REPO / "configs/test_time", tmp_path / "out", [], None)
    source = specs[0]
    assert source["strategy"] == "source"  # a base config that sets Tent: the source row still runs none
    assert "Tent" not in resolved_config(source["configs"], source["overrides"], 1, tmp_path)
    truncated = tmp_path / "t.ckpt"
    truncated.write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(SystemExit, match=r"cannot read --ckpt_path .*t\.ckpt.*Nothing has run"):
        main(["--config", str(base), "--test-time", "tent", "--output", str(tmp_path / "out"), "--ckpt_path",
              str(truncated), "--test-time-configs", str(REPO / "configs/test_time"), "--no-wandb"])
    assert not (tmp_path / "out").exists()


def test_tables_can_omit_accuracy_for_random_weight_runs(tmp_path):
    from lightning_transfer.bench.tables import write_tables

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

    from lightning_transfer.bench.row import _test_batch_budget

    assert _test_batch_budget(SimpleNamespace(limit_test_batches=4)) == 4
    assert _test_batch_budget(SimpleNamespace(limit_test_batches=1)) == 2  # one warm-up batch + one timed
    assert _test_batch_budget(SimpleNamespace(limit_test_batches=1.0)) == 20  # a fraction: the default
    assert _test_batch_budget(SimpleNamespace(limit_test_batches=500)) == 20


def test_pareto_labels_of_crowded_points_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_transfer.bench.plot import place_labels

    fig, ax = plt.subplots(figsize=(5, 4))
    crowded = [(5.0 + 0.1 * i, 40.0 + 0.2 * i, f"strategy_{i}") for i in range(6)]  # within one label's size
    ax.scatter([p[0] for p in crowded] + [1.0], [p[1] for p in crowded] + [30.0])
    ax.set_xscale("log")
    boxes = place_labels(ax, [*crowded, (1.0, 30.0, "alone")])
    assert len(boxes) == 7
    assert not [(i, j) for i in range(7) for j in range(i) if boxes[i].overlaps(boxes[j])]
    alone = next(t for t in ax.texts if t.get_text() == "alone")
    assert alone.arrow_patch is None  # a label with room beside its point needs no leader line
    plt.close(fig)
