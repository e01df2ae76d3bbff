"""`make bench`: every landed strategy on the digits quickstart, 3 seeds, one table and one plot.

Pretrains the quickstart source ViT (digits 0-4) once if runs/quickstart/bench_source/ does not hold it yet, then runs
`python -m lightning_transfer bench` with every registered strategy that runs on a plain vision backbone (the CLIP
strategies need a CLIP backbone) over configs/quickstart.yaml. Rerunning resumes: finished rows are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_transfer.cli import TransferCLI, main
from lightning_transfer.registry import STRATEGIES

SOURCE = Path("runs/quickstart/bench_source")
OUTPUT = Path("runs/bench_digits")


def source_backbone() -> Path:
    weights = SOURCE / "export" / "backbone.safetensors"
    if not weights.is_file():
        print("pretraining the source ViT on digits 0-4 (configs/quickstart_source.yaml) ...", flush=True)
        cli = TransferCLI(args=["fit", "--config", "configs/quickstart_source.yaml", "--trainer.logger=false",
                                f"--trainer.default_root_dir={SOURCE}"])
        main(["export", "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path, "--format", "merged",
              "--output", str(SOURCE / "export")])
    return weights


def run() -> None:
    weights = source_backbone()
    names = [n for n, cls in STRATEGIES.items() if not cls.needs_text_tower and not cls.trains_nothing]
    main(["bench", "--config", "configs/quickstart.yaml", "--strategies", ",".join(names), "--seeds", "3",
          "--output", str(OUTPUT), *sys.argv[1:], "--", f"--model.backbone.init_args.checkpoint_path={weights}"])


if __name__ == "__main__":
    run()
