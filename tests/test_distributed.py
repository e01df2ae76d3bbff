"""DDP for every strategy and test-time method: 2 CPU processes (gloo) give what 1 process gives with the same
global batch; frozen parameters need no ``find_unused_parameters``; only rank 0 writes checkpoints; CAFA's statistics
and LinearProbe's feature cache are shared across processes.

One subprocess (``tests/helpers/distributed_runs.py``) runs everything under DDP once per session; each test then
runs its single-process reference in-process and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from lightning_transfer import distributed
from lightning_transfer.strategies.base import AdaptationStrategy
from lightning_transfer.test_time.cafa import CAFA, class_moments, class_statistics, statistics_from_moments
from tests.conftest import REPO
from tests.helpers import distributed_runs as runs
from tests.helpers.contract_runs import CONTRACT_KEYS, contract_run


@pytest.fixture(scope="session")
def ddp_results(tmp_path_factory) -> dict[int, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "LT_DATA_DIR": str(out / "data"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/helpers/distributed_runs.py"), str(out)], cwd=out,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the DDP processes run
    yield
    torch.set_num_threads(threads)


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(actual) == set(expected), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].float(), value.float(), rtol=1e-3, atol=1e-4, msg=f"{what}: {key}")


@pytest.mark.parametrize("key", runs.run_keys())
def test_two_process_ddp_fit_equals_one_process_with_the_same_global_batch(key, ddp_results, one_thread,
                                                                           monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it; restored afterwards
    rank0, rank1 = ddp_results[0]["strategies"][key], ddp_results[1]["strategies"][key]
    assert ddp_results[0]["world_size"] == 2
    reference = runs.fit_strategy(*runs.comparable_case(key), devices=1, batch_size=2 * runs.PER_RANK_BATCH)
    assert reference["metrics"] and set(rank0["metrics"]) == set(reference["metrics"])
    for name, value in reference["metrics"].items():
        assert rank0["metrics"][name] == pytest.approx(value, abs=1e-5), name
    _close(rank0["params"], reference["params"], f"{key}: DDP vs one process")
    _close(rank1["params"], rank0["params"], f"{key}: rank 1 vs rank 0")
    # frozen parameters have requires_grad=False, which DDP skips: none of our strategies needs the slow search
    assert rank0["find_unused_parameters"] is None


def test_ddp_linear_probe_cache_is_shared_by_the_processes(ddp_results):
    for rank in (0, 1):
        cache = ddp_results[rank]["strategies"]["linear_probe_cache"]["cache"]
        # 20 training images, 10 per process per epoch: each process caches all 20 in epoch 1, and in epoch 2
        # (a different shard of a new permutation) every lookup hits
        assert cache == {"size": 20, "misses": 10, "hits": 10}, (rank, cache)


def test_ddp_only_rank_zero_writes_checkpoints(ddp_results):
    assert ddp_results[0]["strategies"]["lora"]["checkpoint_writes"] > 0
    assert ddp_results[1]["strategies"]["lora"]["checkpoint_writes"] == 0


def test_a_checkpoint_saved_under_ddp_reloads_in_one_process_with_the_trained_weights(ddp_results):
    from lightning_transfer.module import CHECKPOINT_KEY, TransferModule

    lora = ddp_results[0]["strategies"]["lora"]
    saved = torch.load(lora["last_checkpoint"], weights_only=True)
    meta = saved[CHECKPOINT_KEY]
    assert len(meta["rng_states"]) == 2 and len(meta["train_sums"]) == 2  # one entry per process
    # the last step's checkpoint: each process counted its own 10 of the epoch's 20 images
    assert [sums[2] for sums in meta["train_sums"]] == [10, 10]
    module = TransferModule.load_from_checkpoint(lora["last_checkpoint"], weights_only=True)
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    _close(trained, lora["params"], "DDP checkpoint reloaded in one process")


@pytest.mark.parametrize("index", range(len(runs.TEST_TIME_CASES)))
def test_two_process_ddp_test_time_adaptation_equals_one_process(index, ddp_results, one_thread, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it; restored afterwards
    name, init_args, kind = runs.TEST_TIME_CASES[index]
    key = f"{index}-{name}-{kind}"
    reference = runs.test_time_run(name, init_args, kind, devices=1, batch_size=2 * runs.PER_RANK_BATCH)
    for rank in (0, 1):
        ddp = ddp_results[rank]["test_time"][key]
        for metric, value in reference["metrics"].items():
            assert ddp["metrics"][metric] == pytest.approx(value, abs=1e-5), (rank, metric)
        # adapted normalisation parameters and, for CAFA, the source class statistics
        _close(ddp["state"], reference["state"], f"{key} rank {rank}")
    if name == "cafa":
        assert reference["state"]["test_time.class_means"].numel() > 0


@pytest.mark.parametrize("key", CONTRACT_KEYS)
def test_the_core_contracts_run_under_ddp_as_in_one_process(key, ddp_results, one_thread, monkeypatch):
    # two streams, a trainable discriminator, a frozen teacher, a closed-form head fitted on gathered features,
    # the retrieval and anomaly-detection tasks' metrics gathered across processes
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    reference = contract_run(key, devices=1, batch_size=2 * runs.PER_RANK_BATCH)
    for rank in (0, 1):
        ddp = ddp_results[rank]["contracts"][key]
        assert set(ddp["metrics"]) == set(reference["metrics"]) and reference["metrics"], key
        for name, value in reference["metrics"].items():
            assert ddp["metrics"][name] == pytest.approx(value, abs=1e-5), (key, rank, name)
        _close(ddp["params"], reference["params"], f"{key} rank {rank}")
        if "head" in reference:
            _close(ddp["head"], reference["head"], f"{key} closed-form head, rank {rank}")
    if key == "anomaly_detection":
        assert "fit on one device" in ddp_results[0]["contracts"][key]["fit_error"]


# ---- the pieces, in one process ---------------------------------------------------------------------------------
class UnusedParameters(AdaptationStrategy):
    may_have_unused_parameters = True


@pytest.mark.parametrize(("strategy", "flagged", "expected"), [
    ("ddp", True, "ddp_find_unused_parameters_true"),
    ("ddp", False, "ddp"),  # DDP's faster default (off) for everything else
    ("ddp_find_unused_parameters_false", True, "ddp_find_unused_parameters_false"),  # the user chose
])
def test_find_unused_parameters_follows_the_capability_flag_unless_the_user_chose(strategy, flagged, expected):
    from lightning_transfer.cli import TransferCLI

    adaptation = f"{__name__}.UnusedParameters" if flagged else "lightning_transfer.strategies.base.AdaptationStrategy"
    cli = TransferCLI(args=["--config", str(REPO / "configs/quickstart.yaml"), f"--model.adaptation={adaptation}",
                            f"--trainer.strategy={strategy}", "--trainer.logger=false", "--trainer.devices=1",
                            "--trainer.accelerator=cpu"], run=False)
    assert cli.config.trainer.strategy == expected


def test_global_batch_norm_is_batch_norm_over_the_whole_batch():
    # in one process the global batch is the local one: values and gradients equal BatchNorm's own
    layer = nn.BatchNorm2d(3).train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    reference = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    ours = distributed._global_batch_norm(layer, x)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(reference)
    ref_grads = torch.autograd.grad((reference * weights).sum(), [x, layer.weight])
    our_grads = torch.autograd.grad((ours * weights).sum(), [x, layer.weight])
    for ours_g, ref_g in zip(our_grads, ref_grads):
        torch.testing.assert_close(ours_g, ref_g, atol=1e-4, rtol=1e-4)


def test_cafa_moments_add_up_over_shards():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(30, 5, generator=g) + 3.0, torch.arange(30) % 3
    for tied in (False, True):
        halves = [class_moments(f[i::2], y[i::2], 3, tied) for i in (0, 1)]
        summed = [a + b for a, b in zip(*halves)]
        for got, expected in zip(statistics_from_moments(*summed, tied=tied), class_statistics(f, y, 3, tied)):
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_cafa_source_batches_are_split_between_processes_without_overlap(monkeypatch):
    dataset = torch.utils.data.TensorDataset(torch.arange(23).float()[:, None], torch.arange(23) % 2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    method = CAFA(max_source_batches=5)
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 1))
    alone = [b[0].flatten().tolist() for b in method._source_batches(loader)]
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        shards.append([b[0].flatten().tolist() for b in method._source_batches(loader)])
    assert len(alone) == 5 and sorted(alone) == sorted(shards[0] + shards[1])
    assert [len(s) for s in shards] == [3, 2]


def test_ddp_throughput_counts_every_process_s_samples():
    from types import SimpleNamespace

    from lightning_transfer.callbacks.efficiency import EfficiencyMonitor

    class TwoProcesses:  # the other process took as many samples, in 1 s more
        def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
            return {"sum": tensor * 2, "max": tensor + 1}[reduce_op]

    monitor = EfficiencyMonitor(measure_saved_bytes=False)
    monitor._samples, monitor._train_time = 10, 2.0  # this process: 10 samples in 2 s
    trainer = SimpleNamespace(world_size=2, strategy=TwoProcesses(), is_global_zero=True, loggers=[], global_step=4,
                              current_epoch=0)
    monitor.on_train_epoch_end(trainer, SimpleNamespace(device=torch.device("cpu")))
    assert monitor.metrics["perf/train_samples_per_s"] == pytest.approx(20 / 3)  # not 10 / 2, one process's share
    trainer.world_size = 1
    monitor._samples, monitor._train_time = 10, 2.0
    monitor.on_train_epoch_end(trainer, SimpleNamespace(device=torch.device("cpu")))
    assert monitor.metrics["perf/train_samples_per_s"] == pytest.approx(5.0)


@pytest.mark.slow
def test_a_ddp_fit_from_the_command_line_with_a_csv_logger_saves_its_config_and_ends(tmp_path):
    # the config is saved on rank 0 only: reading trainer.log_dir there (a broadcast) left rank 1 waiting for ever
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "LT_DATA_DIR": str(tmp_path / "data"),
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lightning_transfer", "fit", "--config", str(REPO / "configs/quickstart.yaml"),
            "--config", str(REPO / "configs/logger/csv.yaml"), "--trainer.logger.init_args.save_dir=csv",
            "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list((tmp_path / "csv").rglob("config.yaml"))) == 1 and list((tmp_path / "csv").rglob("metrics.csv"))
