"""``python -m lightning_transfer bench summarize``: several bench outputs, one per dataset, in one paper table.

A PETL comparison is usually a table of strategies against datasets (VTAB-1k's 19 tasks, the 11 CoOp datasets) with
a mean column. ``bench`` writes one folder per base config; this reads the ``results.json`` and rows of several such
folders and writes ``summary.csv``, ``summary.md``, ``summary.tex`` and ``summary.json``: one line per strategy, top-1
(mean and std over seeds) per dataset, the mean trainable parameters, and the mean over datasets. When the labels
are VTAB-1k task names, the VTAB group means and both overall means (of the groups, of the 19 tasks) are added once
all 19 are there. A strategy missing or failed on any dataset gets no mean: a mean over fewer datasets would not be
comparable with the others.

    python -m lightning_transfer bench summarize runs/vtab/cifar runs/vtab/dtd ... --output runs/vtab/table
    python -m lightning_transfer bench summarize c100=runs/a dtd=runs/b --output runs/table   # labels given
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from lightning_transfer.bench.config import flat_config
from lightning_transfer.bench.tables import accuracy_cell, best_per_column, latex_escape, latex_table, millions
from lightning_transfer.datamodules.vtab import VTAB_GROUPS, VTAB_TASKS, vtab_means, vtab_task

# settings that may differ between the datasets of one strategy without making the columns incomparable: the data
# itself, the head's size, where runs write and the seeds
_PER_DATASET = ("data.", "model.init_args.num_classes", "trainer.default_root_dir", "seed_everything")


def _parse_folder(arg: str) -> tuple[str, Path]:
    label, sep, path = arg.partition("=")
    folder = Path(path if sep else arg)
    return (label.strip() if sep else folder.resolve().name), folder


def _read_results(label: str, folder: Path) -> list[dict[str, Any]]:
    results = folder / "results.json"
    if not folder.is_dir():
        raise SystemExit(f"bench summarize: {str(folder)!r} ({label}) is not a folder: pass bench --output folders")
    if not results.is_file():
        raise SystemExit(f"bench summarize: {str(folder)!r} ({label}) has no results.json: it is not a bench output "
                         "folder, or its bench run has not finished; run bench with --output there first")
    try:
        table = json.loads(results.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"bench summarize: {results} could not be read ({err}); rerun bench with --output "
                         f"{folder} to write it again") from None
    if not isinstance(table, list) or not all(isinstance(r, dict) and "strategy" in r for r in table):
        raise SystemExit(f"bench summarize: {results} is not a bench results table (a list of rows with a 'strategy')")
    if table and not any("top1_mean" in r for r in table):
        raise SystemExit(f"bench summarize: {results} has no accuracy (bench ran with --omit-accuracy): nothing to "
                         "compare across datasets")
    return table


def _row_settings(folder: Path, strategy: str) -> dict[str, Any] | None:
    """The flattened resolved config of the strategy's first finished row in ``folder``, less per-dataset keys."""
    for path in sorted((folder / "rows").glob(f"{strategy}_seed*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if row.get("status") == "ok" and row.get("config"):
            return {k: v for k, v in flat_config(row["config"]).items() if not k.startswith(_PER_DATASET)}
    return None


def setting_differences(folders: list[tuple[str, Path]], strategies: list[str]) -> list[str]:
    """``strategy: key differs (label=value, ...)`` for settings other than the data that differ between datasets."""
    notes = []
    for strategy in strategies:
        settings = {label: s for label, folder in folders if (s := _row_settings(folder, strategy)) is not None}
        keys = sorted({k for s in settings.values() for k in s})
        for key in keys:
            values = {label: s.get(key) for label, s in settings.items()}
            if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
                shown = ", ".join(f"{label}={value!r}" for label, value in list(values.items())[:4])
                notes.append(f"{strategy}: {key} differs ({shown}{', ...' if len(values) > 4 else ''})")
    return notes


def seed_differences(summary: dict[str, Any]) -> list[str]:
    """``strategy: finished seeds differ (label=n, ...)`` where a strategy's columns average different seed counts (a
    rerun with other ``--seeds``, or seeds that failed): its mean over datasets mixes them."""
    notes = []
    for line in summary["lines"]:
        seeds = {label: cell["seeds"] for label, cell in line["cells"].items() if cell["seeds"]}
        if len(set(seeds.values())) > 1:
            shown = ", ".join(f"{label}={n}" for label, n in list(seeds.items())[:4])
            notes.append(f"{line['strategy']}: finished seeds differ ({shown}{', ...' if len(seeds) > 4 else ''})")
    return notes


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Strategies x datasets: cells (mean, std, seeds), mean trainable parameters and the mean columns.

    ``results`` maps each dataset label to its bench ``results.json`` table, in column order."""
    labels = list(results)
    vtab = all(_is_vtab(label) for label in labels)
    if vtab:
        tasks = [vtab_task(label) for label in labels]
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        if twice:
            raise SystemExit(f"bench summarize: VTAB-1k task(s) {', '.join(twice)} given twice; give each task once")
        order = list(VTAB_TASKS)
        labels = sorted(labels, key=lambda label: order.index(vtab_task(label)))
    strategies = list(dict.fromkeys(r["strategy"] for label in labels for r in results[label]))
    complete_vtab = vtab and len(labels) == len(VTAB_TASKS)
    mean_columns = [*VTAB_GROUPS, "group_mean", "task_mean"] if complete_vtab else ["mean"]
    lines = []
    for strategy in strategies:
        cells, params, errors = {}, [], []
        for label in labels:
            row = next((r for r in results[label] if r["strategy"] == strategy), None)
            if row is None:
                cells[label] = {"mean": None, "std": None, "seeds": 0}
                continue
            cells[label] = {"mean": row.get("top1_mean"), "std": row.get("top1_std"), "seeds": row.get("seeds", 0)}
            if row.get("trainable_params") is not None:
                params.append(row["trainable_params"])
            if row.get("error"):
                errors.append(f"{label}: {row['error']}")
        scores = {label: cell["mean"] for label, cell in cells.items()}
        means: dict[str, float | None] = dict.fromkeys(mean_columns)
        if all(v is not None and not math.isnan(v) for v in scores.values()):
            if complete_vtab:
                means.update(vtab_means(scores))  # type: ignore[arg-type]
            else:
                means["mean"] = sum(scores.values()) / len(scores)  # type: ignore[arg-type]
        lines.append({"strategy": strategy, "cells": cells, "means": means, "errors": errors,
                      "trainable_params_mean": sum(params) / len(params) if params else None})
    return {"labels": labels, "strategies": strategies, "mean_columns": mean_columns, "lines": lines}


def _is_vtab(label: str) -> bool:
    try:
        vtab_task(label)
    except ValueError:
        return False
    return True


_MEAN_NAMES = {"natural": "Natural", "specialized": "Specialized", "structured": "Structured",
               "group_mean": "mean of groups", "task_mean": "mean of tasks", "mean": "mean"}


def _params_text(value: float | None, latex: bool) -> str:
    if value is None:
        return "-"
    return millions(value) if latex else f"{value:,.0f}"


def render(summary: dict[str, Any], latex: bool) -> tuple[list[str], list[list[str]]]:
    labels, mean_columns, lines = summary["labels"], summary["mean_columns"], summary["lines"]
    header = ["strategy", "params (M)" if latex else "trainable params", *labels,
              *(_MEAN_NAMES[c] for c in mean_columns)]
    columns = [[line["cells"][label]["mean"] for line in lines] for label in labels]
    columns += [[line["means"][c] for line in lines] for c in mean_columns]
    bold = [best_per_column(values) for values in columns]
    out = []
    for i, line in enumerate(lines):
        name = latex_escape(line["strategy"]) if latex else line["strategy"]
        cells = [accuracy_cell(line["cells"][label]["mean"], line["cells"][label]["std"], bold[j][i], latex)
                 for j, label in enumerate(labels)]
        cells += [accuracy_cell(line["means"][c], None, bold[len(labels) + j][i], latex)
                  for j, c in enumerate(mean_columns)]
        out.append([name, _params_text(line["trainable_params_mean"], latex), *cells])
    return header, out


def write_summary(summary: dict[str, Any], out: Path, notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    labels, mean_columns = summary["labels"], summary["mean_columns"]
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "trainable_params_mean", *(f"{c}{s}" for c in labels for s in ("", "_std")),
                         *mean_columns])
        for line in summary["lines"]:
            writer.writerow([line["strategy"], line["trainable_params_mean"],
                             *(line["cells"][c][k] for c in labels for k in ("mean", "std")),
                             *(line["means"][c] for c in mean_columns)])
    header, rows = render(summary, latex=False)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    seeds = sorted({cell["seeds"] for line in summary["lines"] for cell in line["cells"].values() if cell["seeds"]})
    intro = (f"top-1 in %, mean ± sample std over {'/'.join(map(str, seeds)) or 'no'} seeds; best per column in bold; "
             "trainable parameters averaged over the datasets (the head's size differs); a strategy missing or failed "
             "on any dataset gets no mean\n\n")
    tail = "".join(f"\n- {n}" for n in notes)
    (out / "summary.md").write_text(intro + "\n".join(md) + "\n" + (f"\nnotes:{tail}\n" if tail else ""))
    header, rows = render(summary, latex=True)
    (out / "summary.tex").write_text(latex_table(header, rows, "Top-1 accuracy (%), mean and std over seeds; "
                                                               "trainable parameters in millions."))
    (out / "summary.json").write_text(json.dumps({**summary, "notes": notes}, indent=1))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_transfer bench summarize",
                                description="Several bench outputs, one per dataset, in one strategies x datasets "
                                "table: summary.csv, .md, .tex and .json in --output.")
    p.add_argument("folders", nargs="+", metavar="[LABEL=]FOLDER",
                   help="bench --output folders, one per dataset; the label defaults to the folder's name")
    p.add_argument("--output", required=True, help="folder for summary.{csv,md,tex,json}")
    args = p.parse_args(argv)
    folders = [_parse_folder(arg) for arg in args.folders]
    labels = [label for label, _ in folders]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise SystemExit(f"bench summarize: label(s) {', '.join(map(repr, twice))} given twice; name the columns "
                         "apart with LABEL=FOLDER")
    if any(not label for label in labels):
        raise SystemExit("bench summarize: an empty label in LABEL=FOLDER; give a name before '='")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"bench summarize: --output {str(out)!r} is a file, not a folder")
    results = {label: _read_results(label, folder) for label, folder in folders}
    summary = summarize(results)
    notes = [f"{line['strategy']} failed on {err}" for line in summary["lines"] for err in line["errors"]]
    notes += [f"{line['strategy']} has no result for {label}" for line in summary["lines"]
              for label in summary["labels"] if line["cells"][label]["seeds"] == 0 and not any(
                  err.startswith(f"{label}:") for err in line["errors"])]
    notes += seed_differences(summary)
    notes += setting_differences(folders, summary["strategies"])
    write_summary(summary, out, notes)
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.tex'}")
