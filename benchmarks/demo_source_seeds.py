"""How much the quickstart's transfer result depends on the source run: the demo's steps over several source seeds.

For each source seed: pretrain the source ViT on digits 0-4 (configs/quickstart_source.yaml with
``--seed_everything=<seed>``, optionally another epoch count), export its backbone, then transfer it to digits 5-9
with 5 shots (configs/quickstart.yaml, FullFinetune, seed 0 as in the demo) and with a linear probe (lr 0.01). Prints
the per-seed test accuracies and their mean, sample std and minimum, plus the from-scratch baseline (which does not
depend on the source). Nothing is logged to W&B; runs go to a temporary folder.

    .venv/bin/python benchmarks/demo_source_seeds.py --seeds 0 1 2 3 4 5 6 7 --source-epochs 30 80
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from lightning_transfer.__main__ import main
from lightning_transfer.cli import TransferCLI

SOURCE, TARGET = "configs/quickstart_source.yaml", "configs/quickstart.yaml"


def fit_and_test(args: list[str]) -> float:
    cli = TransferCLI(args=["fit", *args])
    tested = TransferCLI(args=["test", *args, "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path])
    return float(tested.trainer.callback_metrics["test/acc"])


def one_seed(root: Path, seed: int, epochs: int) -> tuple[float, float, float]:
    """(source accuracy, transfer accuracy, linear-probe accuracy) for one source seed."""
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    src_args = ["--config", SOURCE, f"--seed_everything={seed}", f"--trainer.max_epochs={epochs}",
                f"--model.lr_scheduler.init_args.T_max={epochs}", f"--trainer.default_root_dir={root / 'source'}",
                *quiet]
    cli = TransferCLI(args=["fit", *src_args])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    source = float(TransferCLI(args=["test", *src_args, "--ckpt_path", ckpt]).trainer.callback_metrics["test/acc"])
    main(["export", "--ckpt_path", ckpt, "--format", "merged", "--output", str(root / "backbone")])
    weights = f"--model.backbone.init_args.checkpoint_path={root / 'backbone' / 'backbone.safetensors'}"
    transfer = fit_and_test(["--config", TARGET, weights, f"--trainer.default_root_dir={root / 'transfer'}", *quiet])
    probe = fit_and_test(["--config", TARGET, weights, "--model.adaptation=LinearProbe",
                          "--model.optimizer.init_args.lr=0.01", f"--trainer.default_root_dir={root / 'probe'}",
                          *quiet])
    return source, transfer, probe


def _summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"mean {statistics.mean(values):.1%}  std {spread:.1%}  min {min(values):.1%}"


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--source-epochs", type=int, nargs="+", default=[30])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = fit_and_test(["--config", TARGET, "--model.backbone.init_args.checkpoint_path=null",
                                "--trainer.logger=false", f"--trainer.default_root_dir={Path(tmp) / 'scratch'}"])
        lines = [f"from scratch (no source model): {scratch:.1%}"]
        print(lines[0], flush=True)
        for epochs in args.source_epochs:
            rows = []
            for seed in args.seeds:  # each seed's row as soon as it is measured (a long run can be stopped)
                rows.append(one_seed(Path(tmp) / f"e{epochs}_s{seed}", seed, epochs))
                print(f"source {epochs} epochs, seed {seed}: source {rows[-1][0]:.1%}  transfer {rows[-1][1]:.1%}  "
                      f"linear probe {rows[-1][2]:.1%}", flush=True)
            lines.append(f"\nsource trained {epochs} epochs; per source seed {args.seeds}:")
            for label, column in (("source acc", 0), ("transfer", 1), ("linear probe", 2)):
                values = [r[column] for r in rows]
                lines.append(f"  {label:<13} " + " ".join(f"{v:.1%}" for v in values) + f"   {_summary(values)}")
    print("\n".join(lines))

if __name__ == "__main__":
    main_()
