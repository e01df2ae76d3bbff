"""Never lose a run: a fit killed mid-epoch and resumed with ``--ckpt_path last`` ends exactly as an uninterrupted one
(same W&B run); checkpoints are written atomically; the same seed gives the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from lightning_transfer import checkpointing
from lightning_transfer.checkpointing import PARTIAL_PREFIX, AtomicCheckpointIO
from lightning_transfer.cli import TransferCLI, find_last_checkpoint
from lightning_transfer.datamodules import Digits
from lightning_transfer.datamodules.resumable import EpochShuffleSampler, ResumableDataLoader
from lightning_transfer.module import CHECKPOINT_KEY, TransferModule
from lightning_transfer.registry import STRATEGIES
from tests.conftest import REPO
from tests.helpers.models import tiny_vit

QUICK = str(REPO / "configs" / "quickstart.yaml")
# 25 training images in batches of 5: 5 steps per epoch, 15 in all; a checkpoint every 3 steps, so the kill before
# step 8 leaves last.ckpt at step 6, the first batch of epoch 2
RESUME = """
trainer:
  max_epochs: 3
  deterministic: true
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, save_top_k: 0, every_n_train_steps: 3}
data:
  init_args: {batch_size: 5}
"""


def _cli_fit(tmp_path: Path, *extra: str, dump: str, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # one thread, as this process runs
    # a W&B service started by an earlier test in this process would be shared by the subprocesses, and would still
    # hold the killed run: each subprocess starts its own, as separate launches do
    env.pop("WANDB_SERVICE", None)
    args = [sys.executable, "-m", "lightning_transfer", "fit", "--config", QUICK, "--config", "resume.yaml",
            "--trainer.callbacks+=tests.helpers.resume.DumpMetrics", f"--trainer.callbacks.path={dump}", *extra]
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.run(args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def test_sigkill_mid_epoch_then_ckpt_path_last_ends_as_an_uninterrupted_fit(tmp_path, monkeypatch):
    (tmp_path / "resume.yaml").write_text(RESUME)
    killed = _cli_fit(tmp_path, "--trainer.callbacks+=tests.helpers.resume.KillAtStep", "--trainer.callbacks.step=7",
                      dump="killed.json", name="killed")
    assert killed.returncode == -9, (tmp_path / "killed.log").read_text()[-3000:]
    (last,) = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["global_step"] == 6 and saved["epoch"] == 1  # mid-epoch: 1 of epoch 2's 5 batches done
    run_id = last.parent.parent.name

    resumed = _cli_fit(tmp_path, "--ckpt_path", "last", dump="resumed.json", name="resumed")
    log = (tmp_path / "resumed.log").read_text()
    assert resumed.returncode == 0, log[-3000:]
    assert "Restored all states from the checkpoint" in log and "not resumable" not in log

    # the uninterrupted reference, in this process (one thread, as the subprocesses)
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it; restored afterwards
    reference = TransferCLI(args=["fit", "--config", QUICK, "--config", str(tmp_path / "resume.yaml"),
                                  "--trainer.logger=false", "--trainer.default_root_dir=reference"])
    expected = {k: float(v) for k, v in reference.trainer.callback_metrics.items()}
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert got["global_step"] == reference.trainer.global_step == 15
    assert got["metrics"].keys() >= {"val/acc", "val/loss", "train/loss"}
    for name, value in got["metrics"].items():
        assert value == pytest.approx(expected[name], abs=1e-6), name
    final = _state(last)  # the resumed fit kept writing to the interrupted run's folder
    for key, value in _state(Path(reference.trainer.checkpoint_callback.last_model_path)).items():
        torch.testing.assert_close(final[key], value, atol=1e-6, rtol=0, msg=key)

    # one W&B run, continued: the resumed fit logged to the run id of the killed one
    assert got["loggers"]["WandbLogger"] == run_id
    run_dirs = list(tmp_path.rglob("offline-run-*"))
    assert len(run_dirs) == 2 and {d.name.rsplit("-", 1)[1] for d in run_dirs} == {run_id}


# ---- exact resume in one process, with dropout: the random state travels in the checkpoint -------------------------
class _Crashed(Exception):
    pass


class _Crash(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _Crashed


def _lora_fit(folder: Path, crash_at: int | None = None, ckpt_path: str | None = None,
              accelerator: str = "cpu") -> TransferModule:
    seed_everything(0, verbose=False)
    module = TransferModule(tiny_vit(), STRATEGIES.get("lora")(r=4, dropout=0.1), num_classes=5)
    dm = Digits(task="target", num_shots=4, batch_size=5)  # 20 images: 4 steps per epoch
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=3)]
    if crash_at is not None:
        callbacks.append(_Crash(crash_at))
    trainer = Trainer(accelerator=accelerator, max_epochs=2, logger=False, callbacks=callbacks, deterministic=True,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def _trainable(module: TransferModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_resume_mid_epoch_with_dropout_gives_the_same_weights_and_epoch_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    uninterrupted_module = _lora_fit(tmp_path / "a")
    uninterrupted = _trainable(uninterrupted_module)
    with pytest.raises(_Crashed):
        _lora_fit(tmp_path / "b", crash_at=7)  # last.ckpt after step 6: the 2nd of epoch 2's 4 batches
    crashed = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert crashed["global_step"] == 6
    resumed_module = _lora_fit(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    resumed = _trainable(resumed_module)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    # the interrupted epoch's training numbers are over all 4 of its batches, not only the 2 run after the resume
    expected, got = uninterrupted_module.trainer.callback_metrics, resumed_module.trainer.callback_metrics
    for name in ("train/loss", "train/acc"):
        assert float(got[name]) == pytest.approx(float(expected[name]), abs=1e-6), name
    # saved by 2 DDP processes (each its own shard's sums), resumed on 1: the epoch's numbers are over both shards
    ((loss_sum, correct, count, *_),) = crashed[CHECKPOINT_KEY]["train_sums"]
    assert count == 10  # 2 batches of 5
    crashed[CHECKPOINT_KEY]["train_sums"] = [[loss_sum / 4, 0, 4], [loss_sum * 3 / 4, correct, count - 4]]
    torch.save(crashed, tmp_path / "two.ckpt")
    from_two = _lora_fit(tmp_path / "c", ckpt_path=str(tmp_path / "two.ckpt")).trainer.callback_metrics
    for name in ("train/loss", "train/acc"):
        assert float(from_two[name]) == pytest.approx(float(expected[name]), abs=1e-6), name


def test_same_seed_same_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    first = _trainable(_lora_fit(tmp_path / "a"))
    second = _trainable(_lora_fit(tmp_path / "b"))
    assert all(torch.equal(first[n], second[n]) for n in first)


def _loader(seed: int = 3) -> ResumableDataLoader:
    data = TensorDataset(torch.arange(20))
    sampler = EpochShuffleSampler(data, seed=seed)
    return ResumableDataLoader(data, batch_size=5, sampler=sampler, generator=torch.Generator())


def test_training_loader_resumes_inside_its_epoch_and_not_in_the_next():
    first = _loader()
    first.sampler.set_epoch(1)
    iterator = iter(first)
    taken = [next(iterator)[0].tolist() for _ in range(2)]
    rest = [b[0].tolist() for b in iterator]
    assert sorted(sum(taken + rest, [])) == list(range(20))
    state = first.state_dict()  # as saved after the 4th batch: the epoch is complete
    assert state == {"epoch": 1, "batches": 4, "batch_size": 5, "world_size": 1}
    resumed = _loader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})  # a checkpoint after 2 of the 4 batches of epoch 1
    resumed.sampler.set_epoch(1)
    assert [b[0].tolist() for b in resumed] == rest  # the same remaining batches, the first two never loaded
    assert resumed.state_dict() == {"epoch": 1, "batches": 4, "batch_size": 5, "world_size": 1}
    moved_on = _loader()
    moved_on.load_state_dict({"epoch": 1, "batches": 2})
    moved_on.sampler.set_epoch(2)  # the checkpoint's epoch is over: the next one is whole
    assert len(list(moved_on)) == 4
    other_seed = _loader(seed=4)
    other_seed.sampler.set_epoch(1)
    assert [b[0].tolist() for b in other_seed] != taken + rest


def _shard(rank: int, world: int, batch_size: int = 5) -> ResumableDataLoader:
    data = TensorDataset(torch.arange(40))
    sampler = EpochShuffleSampler(data, num_replicas=world, rank=rank, seed=3)
    sampler.set_epoch(1)
    return ResumableDataLoader(data, batch_size=batch_size, sampler=sampler, generator=torch.Generator())


def _samples(batches) -> list[int]:
    return [i for b in batches for i in b[0].tolist()]


@pytest.mark.parametrize(("saved_world", "resumed_world"), [(2, 1), (1, 2), (2, 4)])
def test_training_loader_resumed_on_another_process_count_leaves_out_exactly_what_was_trained_on(saved_world,
                                                                                                 resumed_world):
    taken, state = [], {}
    for rank in range(saved_world):  # each process of the interrupted fit takes 2 batches of its shard, then stops
        loader = _shard(rank, saved_world)
        iterator = iter(loader)
        taken += _samples(next(iterator) for _ in range(2))
        state = loader.state_dict() if rank == 0 else state
    assert state["batches"] == 2 and state["world_size"] == saved_world
    rest = []
    for rank in range(resumed_world):
        loader = _shard(rank, resumed_world)
        loader.load_state_dict(state)
        rest += _samples(loader)
    assert len(taken) == 10 * saved_world
    assert sorted(taken + rest) == list(range(40))  # every sample once: none trained twice, none left out


# ---- atomic checkpoint writes -------------------------------------------------------------------------------------
def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, target)

    def dies_halfway(obj, f, *args, **kwargs):  # writes part of the file, then the process "dies"
        f.write(b"\x80\x02 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind


def test_fit_writes_checkpoints_through_the_atomic_writer(tmp_path):
    module = TransferModule(tiny_vit(), STRATEGIES.get("linear_probe")(), num_classes=5)
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=Digits(num_shots=2, batch_size=5))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_ckpt_path_last_finds_the_newest_run_and_never_a_partial_file(tmp_path):
    from jsonargparse import Namespace

    for run, age in (("old", 100), ("new", 50)):
        folder = tmp_path / "runs" / "proj" / run / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
        os.utime(folder / "last.ckpt", (1e9 - age, 1e9 - age))
    partial = tmp_path / "runs" / "proj" / "old" / "checkpoints" / f"{PARTIAL_PREFIX}1-ab.tmp"
    partial.write_bytes(b"x")
    logger = Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                       init_args=Namespace(project="proj", save_dir=str(tmp_path / "runs")))
    found = find_last_checkpoint(Namespace(logger=logger, callbacks=[]))
    assert found is not None and found.parent.parent.name == "new"


def test_resuming_from_a_checkpoint_file_continues_its_wandb_run(tmp_path):
    from jsonargparse import Namespace

    from lightning_transfer.cli import continue_run
    from lightning_transfer.module import CHECKPOINT_KEY

    path = tmp_path / "run.ckpt"
    torch.save({CHECKPOINT_KEY: {"loggers": {"WandbLogger": "abc123"}}}, path)
    wandb = Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(project="p", id=None))
    config = Namespace(ckpt_path=str(path), trainer=Namespace(logger=wandb, callbacks=[]))
    continue_run(config)
    assert config.trainer.logger.init_args.id == "abc123" and config.ckpt_path == str(path)
    chosen = Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(id="mine"))
    config = Namespace(ckpt_path=str(path), trainer=Namespace(logger=chosen, callbacks=[]))
    continue_run(config)
    assert config.trainer.logger.init_args.id == "mine"  # an id the user gave wins
