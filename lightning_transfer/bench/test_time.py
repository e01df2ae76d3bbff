"""Test-time methods in the comparison runner: error per corruption and mean, one row per method.

``python -m lightning_transfer bench --config tta.yaml --test-time bn_adapt,tent,cafa --output DIR`` first gets a
source model per seed (``--ckpt_path`` given: that checkpoint; otherwise the base config is fitted once and saved),
then tests it on every test dataloader of the (corruption) datamodule without adaptation (the ``source`` row) and
with each method (its ``configs/test_time/<name>.yaml`` merged over the base). Each job runs in its own subprocess
and writes one JSON row; a rerun with the same ``--output`` skips finished rows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lightning_transfer.bench.config import PARSER_KWARGS, component_config, dump_config, run_args
from lightning_transfer.bench.row import keep_checkpoints_in
from lightning_transfer.bench.tables import (
    accuracy_cell,
    best_per_column,
    latex_escape,
    latex_table,
    mean_of,
    sample_std,
)
from lightning_transfer.registry import TEST_TIME

SOURCE = "source"


def test_time_config(name: str, config_dir: Path) -> Path:
    return component_config("test-time method", name, config_dir, "--test-time-configs", "configs/test_time/")


def check_methods(names: list[str], config_dir: Path) -> None:
    """Before anything runs or is written: every method is registered and has its config."""
    unknown = [n for n in names if n != SOURCE and n not in TEST_TIME]
    if unknown:
        raise SystemExit(f"bench: {TEST_TIME.unknown_message(unknown[0])}")
    for name in names:
        if name != SOURCE:
            test_time_config(name, config_dir)


def jobs(methods: list[str], seeds: int, base: list[str], config_dir: Path, out: Path,
         overrides: list[str], ckpt: str | None) -> list[dict[str, Any]]:
    """The job specs in order: per seed, the source run (which fits when there is no checkpoint) before the methods."""
    specs = []
    for seed in range(1, seeds + 1):
        source_dir = out / "runs" / f"{SOURCE}_seed{seed}"
        source_ckpt = ckpt or str(source_dir / "source.ckpt")
        for method in [SOURCE, *[m for m in methods if m != SOURCE]]:
            extra = [] if method == SOURCE else [str(test_time_config(method, config_dir))]
            # the source row is the model without any test-time method, whatever the base config sets
            own = [*overrides, "--model.test_time=null"] if method == SOURCE else overrides
            specs.append({"kind": "tta", "strategy": method, "seed": seed, "configs": [*base, *extra],
                          "overrides": own, "workdir": str(out / "runs" / f"{method}_seed{seed}"),
                          "row": str(out / "rows" / f"tta_{method}_seed{seed}.json"),
                          "ckpt": source_ckpt if (ckpt or method != SOURCE) else None,
                          "source": checkpoint_identity(ckpt),
                          "fit": ckpt is None and method == SOURCE})
    return specs


def checkpoint_identity(path: str | None) -> str | None:
    """A given source checkpoint as rows record it: its path, size and time, so a rerun notices another file."""
    if path is None:
        return None
    stat = Path(path).stat()
    return f"{path} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"


def run_tta(configs: list[str], overrides: list[str], seed: int, workdir: Path, ckpt: str | None,
            fit: bool) -> dict[str, Any]:
    """Test one method (its config is the last of ``configs``) on every test dataloader; fit first if ``fit``."""
    from lightning_transfer.cli import TransferCLI

    cli = TransferCLI(args=run_args(configs, overrides, seed, workdir), run=False, parser_kwargs=PARSER_KWARGS)
    keep_checkpoints_in(cli.trainer, workdir)
    row: dict[str, Any] = {}
    if fit:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        ckpt = str(workdir / "source.ckpt")
        cli.trainer.save_checkpoint(ckpt)
        row["source_checkpoint"] = ckpt
    # tensors only: a checkpoint is never unpickled here (Lightning's default would unpickle anything)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False,
                               weights_only=True)
    names = list(getattr(cli.datamodule, "test_names", None) or [str(i) for i in range(len(results))])
    if len(names) != len(results):
        names = [str(i) for i in range(len(results))]
    errors = {name: 1.0 - float(r[_accuracy_key(i, len(results))]) for i, (name, r) in
              enumerate(zip(names, results))}
    row.update(errors=errors, mean_error=sum(errors.values()) / len(errors),
               config=dump_config(cli))
    return row


def _accuracy_key(index: int, count: int) -> str:
    return "test/acc" if count == 1 else f"test/acc/dataloader_idx_{index}"


def aggregate_tta(rows: list[dict[str, Any]], methods: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One line per method: error per test set and the mean, averaged over the seeds that finished."""
    sets: list[str] = []
    for r in rows:
        for name in r.get("errors") or {}:
            if name not in sets:
                sets.append(name)
    table = []
    for method in methods:
        mine = [r for r in rows if r["strategy"] == method]
        ok = [r for r in mine if r.get("status") == "ok"]
        line: dict[str, Any] = {"method": method, "seeds": len(ok)}
        for name in sets:
            line[name] = mean_of([r["errors"].get(name) for r in ok])
        line["mean_error"] = mean_of([r["mean_error"] for r in ok])
        line["mean_error_std"] = sample_std([r["mean_error"] for r in ok])
        line["error"] = "; ".join(sorted({r["error"] for r in mine if r.get("status") == "error"})) or None
        table.append(line)
    return table, sets


def write_tta_tables(table: list[dict[str, Any]], sets: list[str], out: Path) -> None:
    columns = ["method", "seeds", *sets, "mean_error", "mean_error_std", "error"]
    with open(out / "results_tta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)

    def cell(value: Any, key: str) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}" if key in (*sets, "mean_error", "mean_error_std") else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[k], k) for k in columns) + " |" for row in table]
    (out / "results_tta.md").write_text("error in % per test set (corruption-severity) and their mean; mean and "
                                        "sample std over seeds\n\n" + "\n".join(lines) + "\n")
    (out / "results_tta.json").write_text(json.dumps(table, indent=1))
    (out / "results_tta.tex").write_text(latex_tta(table, sets))


def latex_tta(table: list[dict[str, Any]], sets: list[str]) -> str:
    """``results_tta.tex``: error per test set and the mean (with its std over seeds), the lowest per column bold."""
    keys = [*sets, "mean_error"]
    bold = {key: best_per_column([row.get(key) for row in table], lowest=True) for key in keys}
    lines = [[latex_escape(row["method"]), *(accuracy_cell(row.get(key), row.get("mean_error_std") if key ==
                                                           "mean_error" else None, bold[key][i], latex=True)
                                             for key in keys)] for i, row in enumerate(table)]
    seeds = sorted({row["seeds"] for row in table if row.get("seeds")})
    return latex_table(["method", *sets, "mean"], lines, f"Error (%) per test set and their mean (std over "
                                                         f"{'/'.join(map(str, seeds)) or 'no'} seeds).")
