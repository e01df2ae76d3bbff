"""`make demo`: pretrain a small ViT on digits 0-4, transfer it to digits 5-9 with 5 shots, compare with scratch.

Every step is a real `python -m lightning_transfer ...` command (printed before it runs); they run in this one
process only to pay the import cost once. Outputs go to a new folder under runs/quickstart/, never over an old one.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from lightning_transfer.__main__ import main
from lightning_transfer.cli import TransferCLI
from lightning_transfer.loggers import default_wandb_mode


def run(args: list[str]) -> TransferCLI | None:
    print(f"\n$ python -m lightning_transfer {shlex.join(args)}", flush=True)
    if args[0] in ("list", "export"):
        main(args)
        return None
    return TransferCLI(args=args)


def fit_and_test(config: list[str], extra: list[str]) -> tuple[float, str, str]:
    """Fit, then test the last checkpoint; return (test accuracy, checkpoint, W&B run dir)."""
    cli = run(["fit", *config, *extra])
    assert cli is not None
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    wandb_dir = str(Path(cli.trainer.logger.experiment.dir).parent)
    cli.trainer.logger.experiment.finish()
    tested = run(["test", *config, *extra, "--ckpt_path", ckpt])
    assert tested is not None
    tested.trainer.logger.experiment.finish()
    return float(tested.trainer.callback_metrics["test/acc"]), ckpt, wandb_dir


def demo() -> None:
    mode = default_wandb_mode()
    out = Path("runs/quickstart") / time.strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    # 1. the project's own pretraining on the source classes
    src_acc, src_ckpt, _ = fit_and_test(["--config", "configs/quickstart_source.yaml"], [])
    run(["export", "--ckpt_path", src_ckpt, "--format", "merged", "--output", str(out / "source_backbone")])
    backbone = str(out / "source_backbone" / "backbone.safetensors")
    # 2. transfer with the strategy named in configs/quickstart.yaml, on 5 shots per target class
    cfg = ["--config", "configs/quickstart.yaml"]
    acc, _, wandb_dir = fit_and_test(cfg, ["--model.backbone.init_args.checkpoint_path", backbone])
    # 3. the same model, shots and budget from random weights
    scratch, _, _ = fit_and_test(cfg, ["--model.backbone.init_args.checkpoint_path", "null",
                                       "--model.adaptation", "FullFinetune"])
    minutes = (time.perf_counter() - start) / 60
    print("\n" + "=" * 72)
    print(f"source model (digits 0-4, all training images): test accuracy {src_acc:.1%}")
    print("target task: digits 5-9, 5 shots per class, same model, epochs and seed")
    print(f"  transfer from the source model : {acc:.1%}")
    print(f"  training from scratch          : {scratch:.1%}")
    print(f"  margin                         : {100 * (acc - scratch):+.1f} points")
    print(f"W&B ({mode or 'online'}) run of the transfer: {wandb_dir}"
          + ("  (upload with `wandb sync <dir>`)" if mode == "offline" else ""))
    print(f"exported source backbone: {backbone}")
    print(f"total time {minutes:.1f} min")
    if acc <= scratch:
        sys.exit("transfer did not beat training from scratch")


if __name__ == "__main__":
    demo()
