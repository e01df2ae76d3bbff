"""The tables of one bench output: ``results.{csv,md,json,tex}`` from the rows, the LaTeX helpers ``bench summarize``
and the test-time tables share, and the table logged to W&B."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

# checkpoint_mb: the resumable checkpoint a run saves (optimizer state included); weights_mb: the same without the
# optimizer and loop state (Trainer.save_checkpoint(weights_only=True)), what keeping the adapted model costs
COLUMNS = ("strategy", "seeds", "top1_mean", "top1_std", "trainable_params", "trainable_pct", "checkpoint_mb",
           "weights_mb", "saved_for_backward_mb", "peak_rss_mb", "cuda_peak_mb", "train_samples_per_s",
           "infer_samples_per_s", "error")


def aggregate(rows: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    """One line per strategy: top-1 mean and std over the seeds that finished, other columns averaged."""
    table = []
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        line: dict[str, Any] = {"strategy": name, "seeds": len(ok)}
        line["top1_mean"] = mean_of([r["top1"] for r in ok])
        line["top1_std"] = sample_std([r["top1"] for r in ok])
        for key in COLUMNS[4:-1]:
            line[key] = mean_of([r.get(key) for r in ok])
        errors = sorted({r["error"] for r in mine if r.get("status") == "error"})
        line["error"] = "; ".join(errors) or None
        table.append(line)
    return table


def note_on_test_sets(rows: list[dict[str, Any]]) -> str:
    """Where the test data has several test sets: top-1 is their mean, each set's accuracy is in the rows."""
    sets = list(dict.fromkeys(name for r in rows if r.get("status") == "ok"
                              for name in (r.get("top1_per_test_set") or {})))
    if not sets:
        return ""
    shown = ", ".join(sets[:6]) + (", ..." if len(sets) > 6 else "")
    return f"top-1 is the mean over {len(sets)} test sets ({shown}; each in rows/, top1_per_test_set)"


def mean_of(values: list[Any]) -> float | None:
    """The mean of the values given (``None`` and NaN, a metric a run did not record, left out); None if none is."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def sample_std(values: list[Any]) -> float | None:
    """The sample standard deviation over seeds of the values given (``None`` left out); None for fewer than two."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None  # the spread of one seed is unknown, not zero
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))  # sample std over seeds


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


_LATEX_SPECIAL = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                                "^": r"\textasciicircum{}"})


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (one pass, so an inserted brace is never escaped again)."""
    return text.translate(_LATEX_SPECIAL)


def latex_table(header: list[str], lines: list[list[str]], caption: str) -> str:
    """A booktabs table (``\\usepackage{booktabs}``): escaped header, cells as given (already LaTeX)."""
    spec = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}", rf"\begin{{tabular}}{{{spec}}}",
           r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(cells) + r" \\" for cells in lines]
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def accuracy_cell(mean: float | None, std: float | None, bold: bool, latex: bool) -> str:
    """Top-1 in % with one decimal and its std over seeds (omitted for one seed); ``-`` where there is none."""
    if mean is None or math.isnan(mean):
        return "-"
    text = f"{100 * mean:.1f}"
    if latex:
        text = rf"\textbf{{{text}}}" if bold else text
        return text + (rf"{{\scriptsize$\pm${100 * std:.1f}}}" if std is not None else "")
    text = f"**{text}**" if bold else text
    return text + (f" ± {100 * std:.1f}" if std is not None else "")


def best_per_column(values: list[float | None], lowest: bool = False) -> list[bool]:
    """Which entries show the highest value (``lowest``: the lowest, for errors) at the printed precision, in %, one
    decimal (ties all bold)."""
    shown = [round(100 * v, 1) if v is not None and not math.isnan(v) else None for v in values]
    top = (min if lowest else max)((v for v in shown if v is not None), default=None)
    return [v is not None and v == top for v in shown]


def millions(count: float) -> str:
    """A parameter count in millions, positional (no exponent), at least two decimals and three significant digits:
    85.80, 0.299, 0.00385."""
    x = count / 1e6
    return f"{x:.{max(2, 2 - math.floor(math.log10(x)))}f}" if x > 0 else "0"


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
