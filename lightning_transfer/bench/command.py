"""``python -m lightning_transfer bench``: several strategies, same backbone, data, budget and seeds, one table.

The command line: checks every name, config and checkpoint before anything runs, runs the jobs
(:mod:`lightning_transfer.bench.runner`) and writes the tables and the plot; ``bench summarize`` is
:mod:`lightning_transfer.bench.summary`.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from lightning_transfer.bench.config import strategy_config
from lightning_transfer.bench.plot import plot_pareto
from lightning_transfer.bench.row import environment
from lightning_transfer.bench.runner import only_runner, run_jobs, worker
from lightning_transfer.bench.tables import COLUMNS, aggregate, log_wandb_table, note_on_test_sets, write_tables
from lightning_transfer.registry import STRATEGIES


def main(argv: list[str]) -> None:
    # the runner and its workers pass each job's arguments to LightningCLI as `args`, by design: Lightning's warning
    # that the process's own command line (bench's) is then not parsed would repeat in every row's log
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return
    if argv and argv[0] == "summarize":
        from lightning_transfer.bench.summary import main as summarize_main

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
        from lightning_transfer.bench import test_time
        from lightning_transfer.registry import TEST_TIME

        methods = _names(args.test_time, "--test-time", TEST_TIME, keep=(test_time.SOURCE,))
        test_time.check_methods(methods, Path(args.test_time_configs))
        if args.ckpt_path:
            _check_checkpoint(args.ckpt_path)
    with only_runner(out):
        failures = [_bench_test_time(args, out, methods)] if methods else []
        if names:
            failures.append(_bench_strategies(args, out, names, strategy_dir))
    failed = [f for f in failures if f]
    if failed:
        raise SystemExit("\n".join(failed))


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 seed is needed")
    return value


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


def _check_checkpoint(path: str) -> None:
    """The source checkpoint exists and reads as tensors (memory-mapped: cheap for a large file), before any run."""
    from lightning_transfer.checkpointing import read_checkpoint

    if not Path(path).is_file():
        raise SystemExit(f"bench: --ckpt_path {path!r} does not exist: pass a .ckpt written by fit")
    try:
        read_checkpoint(path, what="--ckpt_path")
    except ValueError as err:
        raise SystemExit(f"bench: {err} Nothing has run.") from None


def _bench_strategies(args: argparse.Namespace, out: Path, names: list[str], strategy_dir: Path) -> str | None:
    specs = [{"strategy": name, "seed": seed, "configs": [*args.config, str(strategy_config(name, strategy_dir))],
              "overrides": args.overrides, "workdir": str(out / "runs" / f"{name}_seed{seed}"),
              "row": str(out / "rows" / f"{name}_seed{seed}.json")}
             for name in names for seed in range(1, args.seeds + 1)]
    (out / "rows").mkdir(parents=True, exist_ok=True)
    rows = run_jobs(specs)
    _note_other_rows(out, specs)
    table = aggregate(rows, names)
    write_tables(table, out, omit_accuracy=args.omit_accuracy, note=note_on_test_sets(rows))
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


def _bench_test_time(args: argparse.Namespace, out: Path, names: list[str]) -> str | None:
    from lightning_transfer.bench import test_time

    specs = test_time.jobs(names, args.seeds, args.config, Path(args.test_time_configs), out, args.overrides,
                           args.ckpt_path)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(spec["strategy"] for spec in specs))
    rows = run_jobs(specs)
    _note_other_rows(out, specs, test_time=True)
    table, sets = test_time.aggregate_tta(rows, methods)
    test_time.write_tta_tables(table, sets, out)
    print((out / "results_tta.md").read_text())
    print(f"wrote {out / 'results_tta.csv'}, {out / 'results_tta.md'}")
    if not args.no_wandb:
        columns = ["method", "seeds", *sets, "mean_error", "mean_error_std", "error"]
        run_dir = log_wandb_table(table, out, columns, _wandb_settings(args, methods), key="results_tta")
        if run_dir:
            print(f"W&B table: {run_dir}")
    return _failures(rows)


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


def _wandb_settings(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {"configs": list(args.config), "compared": names, "seeds": args.seeds, "overrides": list(args.overrides),
            "ckpt_path": args.ckpt_path, "omit_accuracy": args.omit_accuracy, **environment()}
