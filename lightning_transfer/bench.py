"""``python -m lightning_transfer bench``: several strategies, same backbone, data, budget and seeds, one table.

Each (strategy, seed) runs in its own subprocess (so peak RSS and CUDA peaks are per run, and one crash cannot take
the others down), writes one JSON row under ``OUTPUT/rows/``, and is skipped when rerun with the same ``--output``.
The rows are then aggregated into ``results.csv``, ``results.md``, ``results.json``, ``results.tex`` (LaTeX) and
``pareto.png``. ``bench summarize`` (:mod:`lightning_transfer.bench_summary`) puts several outputs, one per dataset,
in one strategies x datasets table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_transfer.registry import STRATEGIES

PACKAGES = ("torch", "lightning", "timm", "peft", "transformers", "torchmetrics", "lightning-transfer")
# checkpoint_mb: the resumable checkpoint a run saves (optimizer state included); weights_mb: the same without the
# optimizer and loop state (Trainer.save_checkpoint(weights_only=True)), what keeping the adapted model costs
COLUMNS = ("strategy", "seeds", "top1_mean", "top1_std", "trainable_params", "trainable_pct", "checkpoint_mb",
           "weights_mb", "saved_for_backward_mb", "peak_rss_mb", "cuda_peak_mb", "train_samples_per_s",
           "infer_samples_per_s", "error")


# ---- one run ------------------------------------------------------------------------------------------------
def component_config(kind: str, name: str, config_dir: Path, flag: str, examples: str) -> Path:
    """``config_dir/<name>.yaml``, or an error naming the missing folder or file and ``flag`` (before anything runs)."""
    if not config_dir.is_dir():
        raise SystemExit(f"bench: the {kind} config folder {str(config_dir)!r} does not exist (relative paths are "
                         f"from the current folder): run from the repository root or pass {flag} DIR")
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"bench: {kind} {name!r} has no config {path}: write one (see {examples}), "
                         f"or pass {flag} DIR")
    return path


def strategy_config(name: str, config_dir: Path) -> Path:
    return component_config("strategy", name, config_dir, "--strategy-configs", "configs/strategy/")


def _environment() -> dict[str, Any]:
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


def run_args(configs: list[str], overrides: list[str], seed: int, workdir: Path) -> list[str]:
    """The CLI arguments of one run: the configs in order, the overrides, the seed, no logger, output in workdir."""
    args = [item for c in configs for item in ("--config", c)] + list(overrides)
    return args + [f"--seed_everything={seed}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={workdir}"]


# a bad key or value raises (ArgumentError, with jsonargparse's message) instead of printing usage and exiting, so the
# runner can say which strategy's config is wrong, and a worker can record the message in its row
PARSER_KWARGS = {"parser_mode": "omegaconf", "exit_on_error": False}
# what may differ between runs of one job without changing its result: where it writes, and the seeds (the row's file
# name holds the seed; the K-shot draw's seed is set to it)
_NOT_INPUTS = ("seed_everything", "trainer.default_root_dir", "data.init_args.seed")


def dump_config(cli: Any) -> str:
    """The CLI's resolved config as YAML, None-valued keys included."""
    with warnings.catch_warnings():  # jsonargparse >= 4.49 renamed skip_none (skip_unset); 4.32 is supported too
        warnings.filterwarnings("ignore", message=r"(?s).*skip_none")
        return cli.parser.dump(cli.config, skip_none=False, format="yaml")


def resolved_config(configs: list[str], overrides: list[str], seed: int, workdir: Path) -> str:
    """The config a run of these arguments would resolve to (as its row stores it), parsed without building anything.

    Raises ``ArgumentError`` for a key or value the CLI rejects."""
    from lightning_transfer.cli import TransferCLI

    class _ParseOnly(TransferCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    return dump_config(_ParseOnly(args=run_args(configs, overrides, seed, workdir), run=False,
                                  parser_kwargs=PARSER_KWARGS))


def flat_config(text: str) -> dict[str, Any]:
    """A resolved config (YAML) as ``{"dotted.key": value}``."""
    import yaml

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    return flat(yaml.safe_load(text))


def config_changes(stored: str, expected: str) -> list[str]:
    """``key: stored -> expected`` for every setting that differs between two resolved configs (YAML)."""
    old, new = flat_config(stored), flat_config(expected)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if key not in _NOT_INPUTS and old.get(key) != new.get(key)]


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


def _first_loader(loaders: Any) -> Any:
    """The first of several test dataloaders (a list or dict of them), or the one."""
    if isinstance(loaders, dict):
        return next(iter(loaders.values()))
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders


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


def input_files(config: str) -> dict[str, str]:
    """``{"dotted.key": "path (size bytes, modified ns)"}`` for every setting of a resolved config (YAML) that names an
    existing file: backbone weights, statistics, lists. Its path alone does not say which weights a row used: a file
    written again at the same path (a re-exported backbone) makes the finished rows another experiment's."""
    found = {}
    for key, value in flat_config(config).items():
        if key in _NOT_INPUTS or not isinstance(value, str) or not value or "\n" in value:
            continue
        try:
            stat = Path(value).stat()
        except (OSError, ValueError):
            continue
        if Path(value).is_file():
            found[key] = f"{value} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"
    return found


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


def write_json(path: Path, value: Any) -> None:
    """Write whole or not at all: a run killed mid-write leaves the previous file (or none), never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, default=str))
    os.replace(partial, path)


def _worker(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    row: dict[str, Any] = {"strategy": spec["strategy"], "seed": spec["seed"], **_environment(),
                           "input_files": spec.get("input_files", {})}
    if spec.get("kind") == "tta":
        row["source"] = spec["source"]  # the --ckpt_path given (None: the source model was fitted here)
    try:
        if spec.get("kind") == "tta":
            from lightning_transfer.bench_tta import run_tta

            row.update(run_tta(spec["configs"], spec["overrides"], spec["seed"], Path(spec["workdir"]), spec["ckpt"],
                               spec["fit"]))
        else:
            row.update(run_one(spec["configs"], spec["overrides"], spec["seed"], Path(spec["workdir"])))
        row["status"] = "ok"
    except (Exception, SystemExit) as err:  # recorded in the row; the other strategies go on
        row.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    write_json(Path(spec["row"]), row)


# ---- the table ----------------------------------------------------------------------------------------------
def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _std(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None  # the spread of one seed is unknown, not zero
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))  # sample std over seeds


def aggregate(rows: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    """One line per strategy: top-1 mean and std over the seeds that finished, other columns averaged."""
    table = []
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        line: dict[str, Any] = {"strategy": name, "seeds": len(ok)}
        line["top1_mean"] = _mean([r["top1"] for r in ok])
        line["top1_std"] = _std([r["top1"] for r in ok])
        for key in COLUMNS[4:-1]:
            line[key] = _mean([r.get(key) for r in ok])
        errors = sorted({r["error"] for r in mine if r.get("status") == "error"})
        line["error"] = "; ".join(errors) or None
        table.append(line)
    return table


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key in ("top1_mean", "top1_std"):
        return f"{100 * value:.1f}"
    if key == "trainable_params":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_tables(table: list[dict[str, Any]], out: Path, omit_accuracy: bool = False, note: str = "") -> None:
    """``results.{csv,md,json,tex}``; ``note`` (a sentence) is added above the markdown table and to the caption."""
    columns = [c for c in COLUMNS if not (omit_accuracy and c.startswith("top1"))]
    table = [{k: row[k] for k in columns} for row in table]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[k], k) for k in columns) + " |" for row in table]
    what = "" if omit_accuracy else "top-1 in %, mean and sample std over seeds; "
    (out / "results.md").write_text(f"{what}memory and checkpoint size in MiB (2^20 bytes; the _mb columns), "
                                    "throughput in samples/s" + (f"; {note}" if note else "") + "\n\n"
                                    + "\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(table, indent=1))
    (out / "results.tex").write_text(latex_results(table, omit_accuracy, note))


_TEX_HEADER = {"top1_mean": "top-1 (%)", "trainable_params": "params (M)", "trainable_pct": "trainable (%)",
               "checkpoint_mb": "checkpoint (MiB)", "weights_mb": "weights (MiB)",
               "saved_for_backward_mb": "saved for backward (MiB)",
               "peak_rss_mb": "peak RSS (MiB)", "cuda_peak_mb": "CUDA peak (MiB)",
               "train_samples_per_s": "train (samples/s)", "infer_samples_per_s": "inference (samples/s)"}


def latex_results(table: list[dict[str, Any]], omit_accuracy: bool = False, note: str = "") -> str:
    """``results.tex``: the table as a booktabs LaTeX table, top-1 as mean with its std, the best top-1 in bold.

    Columns no row has a value for (``cuda_peak_mb`` on a CPU) are left out; the error column too."""
    from lightning_transfer.bench_summary import accuracy_cell, best_per_column, latex_escape, latex_table, millions

    keys = [k for k in _TEX_HEADER if not (omit_accuracy and k == "top1_mean")
            and any(row.get(k) is not None for row in table)]
    best = best_per_column([row.get("top1_mean") for row in table])
    lines = []
    for i, row in enumerate(table):
        cells = [latex_escape(row["strategy"])]
        for key in keys:
            if key == "top1_mean":
                cells.append(accuracy_cell(row["top1_mean"], row.get("top1_std"), best[i], latex=True))
            elif key == "trainable_params" and row.get(key) is not None:
                cells.append(millions(row[key]))
            else:
                cells.append(latex_escape(_fmt(row.get(key), key)))
        lines.append(cells)
    seeds = sorted({row["seeds"] for row in table if row.get("seeds")})
    caption = ("" if omit_accuracy else f"Top-1 accuracy, mean and std over {'/'.join(map(str, seeds)) or 'no'} "
               "seeds; ") + "memory in MiB, throughput in samples/s."
    caption += f" {note[0].upper()}{note[1:]}." if note else ""
    return latex_table(["strategy", *(_TEX_HEADER[k] for k in keys)], lines, caption)


def plot_pareto(table: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against trainable parameters and against training memory, one labelled point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in table if r["top1_mean"] is not None]
    if not points:
        return False
    memory_key = "cuda_peak_mb" if all(r.get("cuda_peak_mb") for r in points) else "saved_for_backward_mb"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "trainable_params", "trainable parameters"),
              (axes[1], memory_key, f"training memory ({memory_key}, MiB)"))
    for ax, key, label in panels:
        for r in points:
            if r.get(key):
                ax.errorbar(r[key], 100 * r["top1_mean"], yerr=100 * (r["top1_std"] or 0), fmt="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    for ax, key, _ in panels:  # after the layout: the labels are placed where the points finally are
        place_labels(ax, [(r[key], 100 * r["top1_mean"], r["strategy"]) for r in points if r.get(key)])
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def place_labels(ax: Any, points: list[tuple[float, float, str]], max_moves: int = 40) -> list[Any]:
    """Label each point beside it; where that would overlap a label placed before, try just above or below, then
    further away, with a leader line to the point.

    Returns the labels' text boxes in display coordinates, none overlapping another (up to ``max_moves`` tries)."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    placed: list[Any] = []
    for x, y, text in sorted(points, key=lambda p: p[1]):
        for move in range(max_moves + 1):
            rise = 3 + (move + 1) // 2 * 7 * (1 if move % 2 else -1) if move else 3  # 3, 10, -4, 17, -11, ...
            lead = {"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if move > 2 else None
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, rise), fontsize=9,
                                va="bottom" if rise >= 0 else "top", arrowprops=lead)
            label.update_positions(renderer)  # where the offset puts the text (otherwise done when drawing)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            if move == max_moves or not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        placed.append(box)
    return placed


def log_wandb_table(table: list[dict[str, Any]], out: Path, columns: list[str] | tuple[str, ...] = COLUMNS,
                    settings: dict[str, Any] | None = None, key: str = "results") -> str | None:
    """Log ``table`` (its ``columns``) as a W&B table named ``key``, with the command's ``settings`` as the run's
    config (without them a W&B run does not say which configs, strategies, seeds or commit it compares)."""
    from lightning_transfer.loggers import default_wandb_mode

    try:
        import wandb
    except ImportError:
        return None
    default_wandb_mode()
    run = wandb.init(project="lightning-transfer-bench", dir=str(out), name=out.name, reinit="finish_previous",
                     config=settings or {})
    run.log({key: wandb.Table(columns=list(columns), data=[[r.get(k) for k in columns] for r in table])})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


def _wandb_settings(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {"configs": list(args.config), "compared": names, "seeds": args.seeds, "overrides": list(args.overrides),
            "ckpt_path": args.ckpt_path, "omit_accuracy": args.omit_accuracy, **_environment()}


# ---- command line ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 seed is needed")
    return value


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_transfer bench", description=__doc__.splitlines()[0],
                                epilog="python -m lightning_transfer bench summarize [LABEL=]FOLDER ... --output DIR: "
                                "several bench outputs (one per dataset) in one strategies x datasets table")
    p.add_argument("--config", action="append", required=True, help="base config(s), composed in order")
    p.add_argument("--strategies", help="comma-separated registry names, or 'all'")
    p.add_argument("--test-time", help="comma-separated test-time methods (e.g. bn_adapt,tent,cafa) or 'all': "
                   "error per test set of the source model without and with each method")
    p.add_argument("--ckpt_path", help="with --test-time: the source checkpoint (default: fit the base config)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds 1..N (trainer seed and K-shot draw)")
    p.add_argument("--output", required=True, help="result folder; rerunning with it skips finished rows")
    p.add_argument("--strategy-configs", default="configs/strategy", help="folder of <name>.yaml strategy configs")
    p.add_argument("--test-time-configs", default="configs/test_time", help="folder of <name>.yaml method configs")
    p.add_argument("--omit-accuracy", action="store_true",
                   help="leave top-1 out of the table and plot (random-weight runs that measure memory and speed)")
    p.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    p.add_argument("overrides", nargs="*", help="extra --key=value overrides after '--', applied to every run")
    return p.parse_args(argv)


def _names(text: str | None, flag: str, registry: Any, keep: tuple[str, ...] = ()) -> list[str]:
    """A comma-separated list (or 'all'), stripped, each name as the registry spells it (a class name such as 'LoRA'
    is 'lora': its config is ``lora.yaml`` and its rows ``lora_seed*``); a name listed twice is an error rather than a
    row counted twice. Unknown names are kept as given (the caller names them); ``keep`` are taken as they are."""
    if not text:
        return []
    given = registry.names() if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    canonical = {cls: name for name, cls in registry.items()}
    names = [n if n in keep or registry.find(n) is None else canonical[registry.find(n)] for n in given]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"bench: {flag} lists {', '.join(map(repr, twice))} more than once: list each once")
    return names


def _expected_configs(specs: list[dict[str, Any]]) -> None:
    """Resolve each job's config before anything runs (one parse per distinct job), into ``spec["expected"]``.

    A key or value the CLI rejects stops the runner here, naming the job, rather than failing in every worker."""
    from jsonargparse import ArgumentError

    parsed: dict[str, str] = {}
    for spec in specs:
        key = json.dumps([spec["configs"], spec["overrides"]])
        if key not in parsed:
            try:
                parsed[key] = resolved_config(spec["configs"], spec["overrides"], spec["seed"], Path(spec["workdir"]))
            except ArgumentError as err:
                raise SystemExit(f"bench: the config of {spec['strategy']!r} ({' + '.join(spec['configs'])}, "
                                 f"overrides {spec['overrides']}) does not parse: {err}. Nothing has run.") from None
        spec["expected"] = parsed[key]


def _finished_rows(specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows of earlier runs of these jobs that finished, by row path, after checking they are runs of these jobs.

    A finished row whose config or source checkpoint differs from what this command would run stops the runner
    before anything runs: reusing it would put another experiment's numbers in this table, and rerunning it would
    overwrite a result. A row that cannot be read (a run killed mid-write, by an older version) is set aside."""
    finished, stale = {}, []
    for spec in specs:
        path = Path(spec["row"])
        if not path.is_file():
            continue
        try:
            row = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            kept = path.with_name(path.name + ".unreadable")
            os.replace(path, kept)
            print(f"bench: {path} could not be read ({err}); moved to {kept.name}, the run is done again", flush=True)
            continue
        if row.get("status") != "ok":
            continue  # failed before: run again
        changes = config_changes(row.get("config") or "{}", spec["expected"])
        now = input_files(spec["expected"])  # files named by both: the same file (a file made by a run is not)
        changes += [f"{key}: {used} -> {now[key]}" for key, used in (row.get("input_files") or {}).items()
                    if key in now and now[key] != used]
        if spec.get("kind") == "tta" and row.get("source", spec["source"]) != spec["source"]:
            changes.append(f"--ckpt_path: {row.get('source') or 'none'} -> {spec['source'] or 'none'}")
        if changes:
            stale.append(f"  {path.name}: {'; '.join(changes[:4])}" + (" ..." if len(changes) > 4 else ""))
        finished[str(path)] = row
    if stale:
        raise SystemExit("bench: the output folder holds finished runs of these jobs with other settings or input "
                         "files; nothing has run, nothing is overwritten:\n" + "\n".join(stale) + "\nUse a new "
                         "--output, or move those row files out of rows/ to run them again with these settings.")
    return finished


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP end the runner with SystemExit, so the ``finally`` that stops the current worker runs (a
    worker left behind would go on training and write its row into a folder a rerun is using)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_command(spec: dict[str, Any]) -> list[str]:
    worker_spec = {k: v for k, v in spec.items() if k != "expected"}
    worker_spec["input_files"] = input_files(spec["expected"]) if "expected" in spec else {}
    return [sys.executable, "-m", "lightning_transfer", "bench", "--worker", json.dumps(worker_spec)]


def _die_with_runner() -> None:
    """In the worker, before it starts (Linux): SIGTERM when the runner dies, however it dies. A runner killed with
    SIGKILL (or by the out-of-memory killer) runs no ``finally``; its worker would go on training and write its row
    while a rerun into the same output ran the same job again."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _run_worker(spec: dict[str, Any]) -> int:
    proc = subprocess.Popen(_worker_command(spec), env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            preexec_fn=_die_with_runner if sys.platform.startswith("linux") else None)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:  # the runner is stopping (Ctrl-C, SIGTERM): stop the worker with it
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _only_runner(out: Path) -> Iterator[None]:
    """Hold ``out/.bench.lock`` while running: a second bench into the same output stops before anything runs, rather
    than running the same jobs a second time beside the first (both writing the same rows and checkpoints, each
    slowing the other's timings). The lock goes with the process, however it ends."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".bench.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise SystemExit(f"bench: {out} is in use by another bench run ({holder}): wait for it to end, or use "
                             "another --output. Nothing has run.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        yield


def run_jobs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each job in a subprocess unless its row finished before; a job that dies leaves an error row."""
    _expected_configs(specs)
    finished = _finished_rows(specs)
    rows = []
    with _terminate_as_exit():
        for spec in specs:
            row_path, label = Path(spec["row"]), f"{spec['strategy']} seed {spec['seed']}"
            if str(row_path) in finished:
                print(f"bench: {label} done before, skipped", flush=True)
                rows.append(finished[str(row_path)])
                continue
            print(f"bench: {label} ...", flush=True)
            row_path.unlink(missing_ok=True)  # the error row of an earlier try: this try writes its own
            code = _run_worker(spec)
            if not row_path.is_file():  # the worker died before writing its row (killed, out of memory)
                write_json(row_path, {"strategy": spec["strategy"], "seed": spec["seed"], "status": "error",
                                      "error": f"worker exited with code {code} before recording a result"})
            rows.append(json.loads(row_path.read_text()))
    return rows


def _failures(rows: list[dict[str, Any]]) -> str | None:
    failed = [f"{r['strategy']} seed {r['seed']}" for r in rows if r.get("status") != "ok"]
    return f"bench: {len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); their errors are in the table's " \
           "error column and in rows/" if failed else None


def _note_other_rows(out: Path, specs: list[dict[str, Any]], test_time: bool = False) -> None:
    """Name the rows in ``rows/`` of the same kind (strategy or test-time) this command did not ask for."""
    others = sorted({p.name for p in (out / "rows").glob("*.json") if p.name.startswith("tta_") == test_time}
                    - {Path(s["row"]).name for s in specs})
    if others:
        print(f"bench: rows/ also holds rows this command did not ask for ({', '.join(others[:6])}"
              f"{' ...' if len(others) > 6 else ''}); they are kept, and left out of this table", flush=True)


def _check_checkpoint(path: str) -> None:
    """The source checkpoint exists and reads as tensors (memory-mapped: cheap for a large file), before any run."""
    from lightning_transfer.checkpointing import read_checkpoint

    if not Path(path).is_file():
        raise SystemExit(f"bench: --ckpt_path {path!r} does not exist: pass a .ckpt written by fit")
    try:
        read_checkpoint(path, what="--ckpt_path")
    except ValueError as err:
        raise SystemExit(f"bench: {err} Nothing has run.") from None


def _bench_test_time(args: argparse.Namespace, out: Path, names: list[str]) -> str | None:
    from lightning_transfer import bench_tta

    specs = bench_tta.jobs(names, args.seeds, args.config, Path(args.test_time_configs), out, args.overrides,
                           args.ckpt_path)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(spec["strategy"] for spec in specs))
    rows = run_jobs(specs)
    _note_other_rows(out, specs, test_time=True)
    table, sets = bench_tta.aggregate_tta(rows, methods)
    bench_tta.write_tta_tables(table, sets, out)
    print((out / "results_tta.md").read_text())
    print(f"wrote {out / 'results_tta.csv'}, {out / 'results_tta.md'}")
    if not args.no_wandb:
        columns = ["method", "seeds", *sets, "mean_error", "mean_error_std", "error"]
        run_dir = log_wandb_table(table, out, columns, _wandb_settings(args, methods), key="results_tta")
        if run_dir:
            print(f"W&B table: {run_dir}")
    return _failures(rows)


def _test_sets_note(rows: list[dict[str, Any]]) -> str:
    """Where the test data has several test sets: top-1 is their mean, each set's accuracy is in the rows."""
    sets = list(dict.fromkeys(name for r in rows if r.get("status") == "ok"
                              for name in (r.get("top1_per_test_set") or {})))
    if not sets:
        return ""
    shown = ", ".join(sets[:6]) + (", ..." if len(sets) > 6 else "")
    return f"top-1 is the mean over {len(sets)} test sets ({shown}; each in rows/, top1_per_test_set)"


def _bench_strategies(args: argparse.Namespace, out: Path, names: list[str], strategy_dir: Path) -> str | None:
    specs = [{"strategy": name, "seed": seed, "configs": [*args.config, str(strategy_config(name, strategy_dir))],
              "overrides": args.overrides, "workdir": str(out / "runs" / f"{name}_seed{seed}"),
              "row": str(out / "rows" / f"{name}_seed{seed}.json")}
             for name in names for seed in range(1, args.seeds + 1)]
    (out / "rows").mkdir(parents=True, exist_ok=True)
    rows = run_jobs(specs)
    _note_other_rows(out, specs)
    table = aggregate(rows, names)
    write_tables(table, out, omit_accuracy=args.omit_accuracy, note=_test_sets_note(rows))
    plotted = not args.omit_accuracy and plot_pareto(table, out / "pareto.png")
    if not plotted and (out / "pareto.png").is_file():  # drawn from earlier rows: it would contradict the table
        (out / "pareto.png").unlink()
        print(f"bench: removed {out / 'pareto.png'}: no strategy in this table has an accuracy to plot")
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}" + (f", {out / 'pareto.png'}" if plotted else ""))
    if not args.no_wandb:
        columns = [c for c in COLUMNS if not (args.omit_accuracy and c.startswith("top1"))]
        run_dir = log_wandb_table(table, out, columns, _wandb_settings(args, names))
        if run_dir:
            print(f"W&B table: {run_dir}")
    return _failures(rows)


def main(argv: list[str]) -> None:
    # the runner and its workers pass each job's arguments to LightningCLI as `args`, by design: Lightning's warning
    # that the process's own command line (bench's) is then not parsed would repeat in every row's log
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if argv and argv[0] == "--worker":
        _worker(argv[1:])
        return
    if argv and argv[0] == "summarize":
        from lightning_transfer.bench_summary import main as summarize_main

        summarize_main(argv[1:])
        return
    args = parse(argv)
    if not args.strategies and not args.test_time:
        raise SystemExit("bench: pass --strategies (fit and compare) or --test-time (adapt a source model)")
    for config in args.config:
        if not Path(config).is_file():
            raise SystemExit(f"bench: config {config!r} does not exist")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"bench: --output {str(out)!r} is a file, not a folder: pass a folder (new or earlier output)")
    names = _names(args.strategies, "--strategies", STRATEGIES)
    strategy_dir = Path(args.strategy_configs)
    # a name that is no registered strategy is a variant when the folder has its YAML (lora_r16.yaml: LoRA, r=16)
    unknown = [n for n in names if n not in STRATEGIES and not (strategy_dir / f"{n}.yaml").is_file()]
    if unknown:
        raise SystemExit(f"bench: {STRATEGIES.unknown_message(unknown[0])}; or, for a variant of one, write "
                         f"{strategy_dir / (unknown[0] + '.yaml')} choosing its class and options")
    for name in names:
        strategy_config(name, strategy_dir)  # a missing YAML fails before anything runs
    methods: list[str] = []
    if args.test_time:
        from lightning_transfer import bench_tta
        from lightning_transfer.registry import TEST_TIME

        methods = _names(args.test_time, "--test-time", TEST_TIME, keep=(bench_tta.SOURCE,))
        bench_tta.check_methods(methods, Path(args.test_time_configs))
        if args.ckpt_path:
            _check_checkpoint(args.ckpt_path)
    with _only_runner(out):
        failures = [_bench_test_time(args, out, methods)] if methods else []
        if names:
            failures.append(_bench_strategies(args, out, names, strategy_dir))
    failed = [f for f in failures if f]
    if failed:
        raise SystemExit("\n".join(failed))
