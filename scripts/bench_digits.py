"""`make bench`: every landed strategy on the digits quickstart, 3 seeds, one table and one plot.

Pretrains the quickstart source ViT (digits 0-4) once per version of configs/quickstart_source.yaml (the folders carry
a digest of the source and target configs, so an edited config never reuses a stale source model or stale rows), then
runs `python -m lightning_transfer bench` with every registered strategy that runs on a plain vision backbone (the
CLIP strategies need a CLIP backbone) over configs/quickstart.yaml. Rerunning resumes: finished rows are skipped.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from lightning_transfer.__main__ import main
from lightning_transfer.bench import main as bench_main
from lightning_transfer.cli import TransferCLI
from lightning_transfer.registry import STRATEGIES

SOURCE_CONFIG, TARGET_CONFIG = Path("configs/quickstart_source.yaml"), Path("configs/quickstart.yaml")
_SOURCE_DIGEST = hashlib.sha256(SOURCE_CONFIG.read_bytes()).hexdigest()[:8]
_DIGEST = hashlib.sha256(SOURCE_CONFIG.read_bytes() + TARGET_CONFIG.read_bytes()).hexdigest()[:8]
SOURCE = Path(f"runs/quickstart/bench_source_{_SOURCE_DIGEST}")
OUTPUT = Path(f"runs/bench_digits_{_DIGEST}")


def source_backbone() -> Path:
    weights = SOURCE / "export" / "backbone.safetensors"
    if not weights.is_file():
        print("pretraining the source ViT on digits 0-4 (configs/quickstart_source.yaml) ...", flush=True)
        cli = TransferCLI(args=["fit", "--config", str(SOURCE_CONFIG), "--trainer.logger=false",
                                f"--trainer.default_root_dir={SOURCE}"])
        main(["export", "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path, "--format", "merged",
              "--output", str(SOURCE / "export")])
    return weights


def run() -> None:
    weights = source_backbone()
    names = [n for n, cls in STRATEGIES.items() if not cls.needs_text_tower and not cls.trains_nothing]
    bench_main(["--config", str(TARGET_CONFIG), "--strategies", ",".join(names), "--seeds", "3",
                "--output", str(OUTPUT), *sys.argv[1:], "--", f"--model.backbone.init_args.checkpoint_path={weights}"])
    print(f"results: {OUTPUT}/results.md and {OUTPUT}/pareto.png (the README's table and docs/bench_digits_pareto.png)")


if __name__ == "__main__":
    run()
