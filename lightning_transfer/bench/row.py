"""One strategy row, in the worker process: fit and test one configuration through ``TransferCLI``, measure it, and
record where it came from (package versions, the commit and whether it had uncommitted changes)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_transfer.bench.config import PARSER_KWARGS, dump_config, run_args

PACKAGES = ("torch", "lightning", "timm", "peft", "transformers", "torchmetrics", "lightning-transfer")


def environment() -> dict[str, Any]:
    """Where a row came from: the versions of ``PACKAGES``, the git commit of this package's source, and whether its
    tracked files had uncommitted changes (None where there is no git or no repository)."""
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    # the commit alone does not say what ran when tracked files had uncommitted changes
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status.strip()), "versions": versions}


def run_one(configs: list[str], overrides: list[str], seed: int, workdir: Path) -> dict[str, Any]:
    """Fit and test one configuration in this process; return its row (metrics + provenance)."""
    from lightning_transfer.callbacks.efficiency import EfficiencyMonitor
    from lightning_transfer.cli import TransferCLI

    args = run_args(configs, overrides, seed, workdir)
    cli = TransferCLI(args=args, run=False, parser_kwargs=PARSER_KWARGS)
    if getattr(cli.datamodule, "seed", seed) != seed:  # vary the K-shot draw with the seed too
        cli = TransferCLI(args=[*args, f"--data.init_args.seed={seed}"], run=False, parser_kwargs=PARSER_KWARGS)
    keep_checkpoints_in(cli.trainer, workdir)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    tested = row_metrics(cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False),
                          getattr(cli.datamodule, "test_names", None))
    ckpt = workdir / "final.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=False)  # resumable: optimizer state included, as fit saves it
    weights = workdir / "weights_only.ckpt"  # what storing the adapted model for this task costs
    cli.trainer.save_checkpoint(weights, weights_only=True)
    weights_mb = weights.stat().st_size / 2**20
    weights.unlink()
    callbacks = cli.trainer.callbacks  # type: ignore[attr-defined]
    monitor = next(cb for cb in callbacks if isinstance(cb, EfficiencyMonitor))
    m = monitor.metrics
    return {
        **tested,
        "trainable_params": m.get("params/trainable"), "total_params": m.get("params/total"),
        "trainable_pct": m.get("params/trainable_pct"), "checkpoint_mb": ckpt.stat().st_size / 2**20,
        "weights_mb": weights_mb,
        "saved_for_backward_mb": m.get("memory/saved_for_backward_mb"), "peak_rss_mb": m.get("memory/peak_rss_mb"),
        "cuda_peak_mb": m.get("memory/cuda_peak_mb"), "train_samples_per_s": m.get("perf/train_samples_per_s"),
        "infer_samples_per_s": _inference_throughput(cli.model, _first_loader(cli.datamodule.test_dataloader()),
                                                     _test_batch_budget(cli.trainer), cli.trainer.precision_plugin),
        "fit_seconds": fit_seconds, "config": dump_config(cli),
    }


def row_metrics(results: Sequence[Mapping[str, float]], names: list[str] | None = None) -> dict[str, Any]:
    """Top-1, top-5 and ECE from ``trainer.test``'s results (one dict per test dataloader).

    With several test sets (one per corruption, ...) Lightning suffixes every key with ``/dataloader_idx_i``: each
    number is then the mean over the test sets, and ``top1_per_test_set`` keeps the accuracy of each (named by the
    datamodule's ``test_names`` where it has them)."""
    keys = {"top1": "test/acc", "top5": "test/acc_top5", "ece": "test/ece"}
    if len(results) == 1:
        return {name: results[0].get(key) for name, key in keys.items()}
    if not names or len(names) != len(results):
        names = [str(i) for i in range(len(results))]

    def mean_over_sets(key: str) -> float | None:
        values = [r.get(f"{key}/dataloader_idx_{i}") for i, r in enumerate(results)]
        found = [v for v in values if v is not None]
        return sum(found) / len(found) if found and len(found) == len(values) else None

    per_set = {name: r.get(f"test/acc/dataloader_idx_{i}") for i, (name, r) in enumerate(zip(names, results))}
    return {**{name: mean_over_sets(key) for name, key in keys.items()}, "top1_per_test_set": per_set}


def keep_checkpoints_in(trainer: Any, workdir: Path) -> None:
    """Point every ``ModelCheckpoint`` with a ``dirpath`` of its own at ``workdir/checkpoints``.

    A base config's ``dirpath`` (e.g. ``runs/tta_cifar10c/checkpoints``, relative to the current folder) would put
    every row's checkpoints into the folder of the user's own run, beside its ``last.ckpt``, and into each other's;
    each row keeps its checkpoints under its own ``--output`` folder instead (several callbacks: one folder each)."""
    callbacks = list(getattr(trainer, "checkpoint_callbacks", []))
    for i, callback in enumerate(callbacks):
        if getattr(callback, "dirpath", None) is not None:
            folder = workdir / "checkpoints"
            callback.dirpath = str(folder / str(i) if len(callbacks) > 1 else folder)


def _inference_throughput(module: Any, loader: Any, max_batches: int = 20, precision: Any = None) -> float:
    """Test images per second of ``module``'s forward pass, the first batch left out as warm-up.

    Args:
        module: the fitted model, on its device.
        loader: a test dataloader yielding ``(inputs, targets)``.
        max_batches: timed batches at most.
        precision: the trainer's precision plugin: the inputs are cast and the forward runs in its context as in
            ``trainer.test`` (a bf16-true model takes bf16 inputs; a mixed-precision one runs under autocast).
    """
    import torch

    context = precision.test_step_context if precision is not None else contextlib.nullcontext
    cuda = module.device.type == "cuda"

    def seconds(x: Any) -> float:
        if cuda:  # CUDA runs asynchronously: time the kernels, not their launch
            torch.cuda.synchronize(module.device)
        start = time.perf_counter()
        module(x)
        if cuda:
            torch.cuda.synchronize(module.device)
        return time.perf_counter() - start

    module.eval()
    seen, elapsed, first = 0, 0.0, None
    with torch.no_grad(), context():
        for i, batch in enumerate(loader):
            x = batch[0].to(module.device)
            if precision is not None:
                x = precision.convert_input(x)
            took = seconds(x)
            if i == 0:  # the first batch warms up
                first = x
            else:
                elapsed, seen = elapsed + took, seen + len(x)
            if i >= max_batches:
                break
        if seen == 0 and first is not None:  # a test set of one batch: time that batch again, warmed up
            for _ in range(min(max_batches, 5)):
                elapsed, seen = elapsed + seconds(first), seen + len(first)
    return seen / elapsed if elapsed > 0 else float("nan")


def _test_batch_budget(trainer: Any, default: int = 20) -> int:
    """Batches for the inference timing: 20, or fewer where the config limits the test batches to a number."""
    limit = getattr(trainer, "limit_test_batches", None)
    return max(2, min(default, limit)) if isinstance(limit, int) and not isinstance(limit, bool) else default


def _first_loader(loaders: Any) -> Any:
    """The first of several test dataloaders (a list or dict of them), or the one."""
    if isinstance(loaders, dict):
        return next(iter(loaders.values()))
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders
