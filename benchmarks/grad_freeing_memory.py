"""Training memory with and without TransferModule freeing gradients before the forward pass, side by side.

Lightning zeroes gradients inside its closure, after training_step, so by default the previous step's gradients stay
allocated through the forward pass; TransferModule.on_train_batch_start frees them first. This fits FullFinetune on
a ViT-B/16-shaped model (random weights) through the Trainer both ways, each run in its own subprocess so that the
peak is its own, alternating the two variants, and prints the peak: CUDA memory allocated on a GPU, RSS on a CPU.

    python benchmarks/grad_freeing_memory.py                       # CPU: batch 8, 4 steps, 2 runs of each
    python benchmarks/grad_freeing_memory.py --accelerator gpu --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def run_one(freeing: bool, accelerator: str, batch: int, steps: int) -> dict[str, float]:
    """One fit in this process; the peak memory it reached."""
    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_transfer.backbones.timm import TimmBackbone
    from lightning_transfer.callbacks.efficiency import peak_rss_bytes
    from lightning_transfer.module import TransferModule
    from lightning_transfer.strategies import FullFinetune

    class KeepsGradients(TransferModule):
        def on_train_batch_start(self, batch, batch_idx) -> None:  # Lightning's default: nothing before forward
            pass

    torch.manual_seed(0)
    cls = TransferModule if freeing else KeepsGradients
    module = cls(TimmBackbone("vit_base_patch16_224"), FullFinetune(), num_classes=10,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    data = TensorDataset(torch.randn(batch * steps, 3, 224, 224), torch.randint(0, 10, (batch * steps,)))
    trainer = Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=batch))
    result = {"peak_rss_mb": peak_rss_bytes() / 2**20}
    if accelerator == "gpu":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--_child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_one(args._child == "on", args.accelerator, args.batch, args.steps)))
        return
    if min(args.batch, args.steps, args.repeats) < 1:
        parser.error("--batch, --steps and --repeats must be at least 1")
    key = "cuda_peak_mb" if args.accelerator == "gpu" else "peak_rss_mb"
    peaks: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for variant in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--_child", variant, "--accelerator", args.accelerator,
                                  "--batch", str(args.batch), "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"the fit with gradient freeing {variant} failed:\n{out.stderr[-3000:]}")
            peaks[variant].append(json.loads(out.stdout.strip().splitlines()[-1])[key])
    print(f"FullFinetune, vit_base_patch16_224 (random weights), batch {args.batch}, {args.steps} steps, "
          f"{args.accelerator}; {key} per run, each in its own process")
    for variant, label in (("off", "gradients kept until Lightning's zero_grad"),
                           ("on", "gradients freed before the forward (TransferModule)")):
        runs = ", ".join(f"{p:,.0f}" for p in peaks[variant])
        print(f"  {label:<52} median {statistics.median(peaks[variant]):>8,.0f} MB  ({runs})")
    saved = statistics.median(peaks["off"]) - statistics.median(peaks["on"])
    print(f"  saved: {saved:,.0f} MB ({100 * saved / statistics.median(peaks['off']):.1f}% of the peak)")


if __name__ == "__main__":
    main()
