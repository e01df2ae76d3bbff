"""What one bench row measures: inference timing under the trainer's precision, several test sets, where a row's
checkpoints go, and how strategy names are spelt (found by using the runner)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_transfer.bench import main
from lightning_transfer.bench.command import _names
from lightning_transfer.bench.row import _inference_throughput, row_metrics, run_one
from lightning_transfer.registry import STRATEGIES, TEST_TIME
from tests.conftest import REPO


class _Probe(nn.Module):
    """A linear model that records the dtype of what reaches it and of what it returns."""

    device = torch.device("cpu")

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2).to(dtype)
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        self.seen.append((x.dtype, out.dtype))
        return out


def _loader(batches: int = 4):
    return [(torch.randn(3, 4), torch.zeros(3, dtype=torch.long)) for _ in range(batches)]


def test_inference_timing_runs_the_model_as_the_trainers_precision_does():
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision

    bf16 = _Probe(torch.bfloat16)  # bf16-true: the module is cast, float32 test images must be cast too
    rate = _inference_throughput(bf16, _loader(), precision=HalfPrecision("bf16-true"))
    assert math.isfinite(rate) and rate > 0 and {x for x, _ in bf16.seen} == {torch.bfloat16}
    mixed = _Probe()  # bf16-mixed: float32 weights, the forward under autocast as in trainer.test
    _inference_throughput(mixed, _loader(), precision=MixedPrecision("bf16-mixed", "cpu"))
    assert {out for _, out in mixed.seen} == {torch.bfloat16}
    plain = _Probe()
    _inference_throughput(plain, _loader())
    assert {out for _, out in plain.seen} == {torch.float32}


def test_a_bf16_true_row_is_measured_and_keeps_its_checkpoints_under_its_own_folder(tmp_path, monkeypatch):
    # the base config names a checkpoint folder of its own, relative to the current folder, as the README's
    # tta_cifar10c.yaml does: the user's run there is left alone
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "mine" / "checkpoints"
    user.mkdir(parents=True)
    (user / "last.ckpt").write_text("the user's checkpoint")
    base = tmp_path / "base.yaml"
    base.write_text((REPO / "configs/quickstart.yaml").read_text().replace(
        "init_args: {save_last: true, save_top_k: 0}", "init_args: {dirpath: mine/checkpoints, save_last: true}"))
    workdir = tmp_path / "out" / "runs" / "linear_probe_seed1"
    row = run_one([str(base), str(REPO / "configs/strategy/linear_probe.yaml")],
                  ["--trainer.max_epochs=1", "--trainer.precision=bf16-true"], 1, workdir)
    assert 0 <= row["top1"] <= 1 and math.isfinite(row["infer_samples_per_s"]) and row["infer_samples_per_s"] > 0
    assert sorted(p.name for p in user.iterdir()) == ["last.ckpt"]
    assert (user / "last.ckpt").read_text() == "the user's checkpoint"
    assert (workdir / "checkpoints" / "last.ckpt").is_file()


def test_row_metrics_of_several_test_sets_are_their_means():
    one = row_metrics([{"test/acc": 0.5, "test/acc_top5": 0.9, "test/ece": 0.1}])
    assert one == {"top1": 0.5, "top5": 0.9, "ece": 0.1}
    two = row_metrics([{"test/acc/dataloader_idx_0": 0.2, "test/ece/dataloader_idx_0": 0.1},
                          {"test/acc/dataloader_idx_1": 0.6, "test/ece/dataloader_idx_1": 0.3}], ["fog-1", "snow-1"])
    assert two["top1"] == pytest.approx(0.4) and two["ece"] == pytest.approx(0.2) and two["top5"] is None
    assert two["top1_per_test_set"] == {"fog-1": 0.2, "snow-1": 0.6}
    assert list(row_metrics([{}, {}], ["only one name"])["top1_per_test_set"]) == ["0", "1"]


def test_a_row_over_a_corruption_datamodule_reports_every_test_set(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 40)):
        np.savez(tmp_path / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10)
    base = tmp_path / "c.yaml"
    base.write_text(f"""\
trainer: {{max_epochs: 1, accelerator: cpu, enable_checkpointing: false}}
model:
  backbone: {{class_path: lightning_transfer.backbones.cifar_resnet.CIFARResNet20}}
  adaptation: {{class_path: LinearProbe}}
data:
  class_path: lightning_transfer.datamodules.corruption.NpzImages
  init_args: {{data_dir: {tmp_path}, train_file: train.npz, test_file: test.npz, corruptions: [gaussian_noise, fog],
              severities: [1], batch_size: 10, val_fraction: 0.2}}
""")
    row = run_one([str(base)], [], 1, tmp_path / "run")
    per_set = row["top1_per_test_set"]
    assert list(per_set) == ["gaussian_noise-1", "fog-1"] and all(0 <= v <= 1 for v in per_set.values())
    assert row["top1"] == pytest.approx(sum(per_set.values()) / 2)
    assert math.isfinite(row["infer_samples_per_s"])  # timed on the first test set


def test_strategy_names_are_taken_as_the_registry_spells_them(tmp_path):
    assert _names("LoRA, linear_probe", "--strategies", STRATEGIES) == ["lora", "linear_probe"]
    assert _names("source,Tent", "--test-time", TEST_TIME, keep=("source",)) == ["source", "tent"]
    assert _names("lorax", "--strategies", STRATEGIES) == ["lorax"]  # named as unknown by the caller
    with pytest.raises(SystemExit, match="lists 'lora' more than once"):
        _names("lora,LoRA", "--strategies", STRATEGIES)
    configs = tmp_path / "strategies"
    configs.mkdir()
    with pytest.raises(SystemExit, match=r"strategy 'lora' has no config .*lora\.yaml"):
        main(["--config", str(REPO / "configs/quickstart.yaml"), "--strategies", "LoRA", "--output",
              str(tmp_path / "out"), "--strategy-configs", str(configs)])
    assert json.dumps(_names("all", "--strategies", STRATEGIES)) == json.dumps(STRATEGIES.names())


def test_a_second_runner_into_the_same_output_stops_before_running(tmp_path):
    from lightning_transfer.bench.runner import only_runner

    out = tmp_path / "out"
    with only_runner(out):  # a first bench run holds the output
        with pytest.raises(SystemExit, match=r"in use by another bench run \(pid \d+\).*Nothing has run"):
            main(["--config", str(REPO / "configs/quickstart.yaml"), "--strategies", "linear_probe", "--seeds", "1",
                  "--output", str(out), "--strategy-configs", str(REPO / "configs/strategy"), "--no-wandb"])
    assert not (out / "rows").exists()
    with only_runner(out):  # released when the first ends
        pass


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_runner_killed_outright_takes_its_worker_with_it():
    import subprocess
    import sys
    import time
    from pathlib import Path

    runner_code = """
import subprocess, sys
from lightning_transfer.bench import runner
runner._worker_command = lambda spec: [sys.executable, "-c", "import time; time.sleep(60)"]
class Shown(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print(self.pid, flush=True)
runner.subprocess.Popen = Shown
runner._run_worker({})
"""
    runner = subprocess.Popen([sys.executable, "-c", runner_code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    worker = int(runner.stdout.readline())
    runner.kill()  # SIGKILL: no finally, no signal handler runs in the runner
    runner.wait()

    def alive(pid: int) -> bool:
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive(worker)
    finally:
        if alive(worker):
            __import__("os").kill(worker, 9)


def test_rows_say_whether_the_commit_had_uncommitted_changes(monkeypatch):
    import subprocess

    from lightning_transfer.bench import row

    def fake_git(status_out: str):
        def run(args, **kwargs):
            out = "abc123\n" if args[1] == "rev-parse" else status_out
            return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")
        return run

    monkeypatch.setattr(row.subprocess, "run", fake_git(" M lightning_transfer/bench/row.py\n"))
    assert row.environment()["git_commit"] == "abc123" and row.environment()["git_dirty"] is True
    monkeypatch.setattr(row.subprocess, "run", fake_git(""))
    assert row.environment()["git_dirty"] is False


def test_test_time_rows_read_the_source_checkpoint_as_tensors_only(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    from lightning_transfer.bench.test_time import run_tta

    seen = {}

    def test(self, model=None, dataloaders=None, ckpt_path=None, verbose=True, datamodule=None, weights_only=None):
        seen.update(ckpt_path=ckpt_path, weights_only=weights_only)
        return [{"test/acc": 0.75}]

    monkeypatch.setattr(Trainer, "test", test)
    row = run_tta([str(REPO / "configs/quickstart.yaml")], [], 1, tmp_path / "run", "given.ckpt", fit=False)
    assert seen == {"ckpt_path": "given.ckpt", "weights_only": True} and row["mean_error"] == pytest.approx(0.25)


def test_the_wandb_table_says_what_was_compared_and_leaves_out_omitted_accuracy(tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    from lightning_transfer.bench import command

    logged: dict = {}

    class Run:
        dir = str(tmp_path / "wandb" / "run-1" / "files")

        def log(self, values):
            logged.update(values)

        def finish(self):
            pass

    def init(**kwargs):
        logged["config"] = kwargs["config"]
        return Run()

    fake = SimpleNamespace(init=init, Table=lambda columns, data: {"columns": columns, "data": data})
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(command, "run_jobs", lambda specs: [
        {"strategy": "linear_probe", "seed": 1, "status": "ok", "top1": 0.5, "trainable_params": 325}])
    main(["--config", str(REPO / "configs/quickstart.yaml"), "--strategies", "linear_probe", "--seeds", "1",
          "--output", str(tmp_path / "out"), "--strategy-configs", str(REPO / "configs/strategy"), "--omit-accuracy",
          "--", "--trainer.max_epochs=2"])
    table = logged["results"]
    assert "top1_mean" not in table["columns"] and table["data"][0][table["columns"].index("trainable_params")] == 325
    config = logged["config"]
    assert config["compared"] == ["linear_probe"] and config["seeds"] == 1 and config["omit_accuracy"] is True
    assert config["overrides"] == ["--trainer.max_epochs=2"] and config["configs"][0].endswith("quickstart.yaml")
    assert "git_commit" in config and config["versions"]["torch"]


def test_a_weights_file_written_again_makes_finished_rows_stale(tmp_path, monkeypatch):
    import os

    from lightning_transfer.bench import config as bench_config
    from lightning_transfer.bench import runner

    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"first export")
    configs = [str(REPO / "configs/quickstart.yaml"), str(REPO / "configs/strategy/linear_probe.yaml")]
    overrides = [f"--model.backbone.init_args.checkpoint_path={weights}"]
    out = tmp_path / "out"
    config = bench_config.resolved_config(configs, overrides, 1, out / "runs" / "linear_probe_seed1")
    assert list(bench_config.input_files(config)) == ["model.backbone.init_args.checkpoint_path"]
    (out / "rows").mkdir(parents=True)
    row = out / "rows" / "linear_probe_seed1.json"
    row.write_text(json.dumps({"strategy": "linear_probe", "seed": 1, "status": "ok", "top1": 0.5, "config": config,
                               "input_files": bench_config.input_files(config)}))
    monkeypatch.setattr(runner, "_run_worker", lambda spec: pytest.fail("a finished row was run again"))
    argv = ["--config", configs[0], "--strategies", "linear_probe", "--seeds", "1", "--output", str(out),
            "--strategy-configs", str(REPO / "configs/strategy"), "--no-wandb", "--", *overrides]
    main(argv)  # the same file: the row is reused
    saved = row.read_bytes()
    weights.write_bytes(b"second export, other weights")
    os.utime(weights, ns=(1, 1))
    with pytest.raises(SystemExit, match=r"other settings or input files(.|\n)*checkpoint_path: .*12 bytes.* -> "
                                         r".*28 bytes"):
        main(argv)
    assert row.read_bytes() == saved


def test_inference_timing_of_a_test_set_of_one_batch_is_measured():
    probe = _Probe()
    rate = _inference_throughput(probe, _loader(batches=1))
    assert math.isfinite(rate) and rate > 0 and len(probe.seen) > 1  # the warm-up batch, then timed again


def test_the_tables_say_when_top1_is_a_mean_over_test_sets(tmp_path):
    from lightning_transfer.bench.tables import aggregate, note_on_test_sets, write_tables

    rows = [{"strategy": "a", "seed": 1, "status": "ok", "top1": 0.4,
             "top1_per_test_set": {"fog-5": 0.2, "snow-5": 0.6}}]
    note = note_on_test_sets(rows)
    assert note.startswith("top-1 is the mean over 2 test sets (fog-5, snow-5")
    write_tables(aggregate(rows, ["a"]), tmp_path, note=note)
    assert note in (tmp_path / "results.md").read_text()
    assert "Top-1 is the mean over 2 test sets" in (tmp_path / "results.tex").read_text()
    assert note_on_test_sets([{"strategy": "a", "status": "ok", "top1": 0.4}]) == ""
