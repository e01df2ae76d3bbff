"""Training memory and step time of memory-efficient strategies against FullFinetune, side by side in one run.

ViT-B/16-shaped model (``vit_base_patch16_224``, random weights: depth 12, width 768, 224x224), batch 8, CPU.
For each strategy, in its own subprocess (so peak RSS is per strategy): bytes saved for backward in one training
step (parameters excluded, :class:`SavedTensorsCounter`), peak RSS and how much training added to it, and the
median time of a full training step (forward, backward, AdamW step). Ratios are to FullFinetune's numbers.
With ``--device cuda`` it also reports the peak CUDA memory allocated during a training step (weights, optimizer
state and activations together, measured after the warm-up step) and times steps with the device synchronised.

    .venv/bin/python benchmarks/memory_efficiency.py [--steps 3] [--batch 8] [--device cuda [--bf16]]

Targets (issue 4): VQT <= 15% and SHERL <= 25% of FullFinetune's saved bytes; step time of both < 0.6x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# label -> (registry name, init_args)
STRATEGIES = {
    "FullFinetune": ("full", {}),
    "LinearProbe": ("linear_probe", {}),
    "VQT T=1": ("vqt", {"num_queries": 1}),
    "VQT T=10": ("vqt", {"num_queries": 10}),
    "SHERL": ("sherl", {}),
    "LoRA": ("lora", {}),
}


def measure(name: str, init_args: dict, steps: int, batch: int, device: str = "cpu",
            bf16: bool = False) -> dict[str, float]:
    """One strategy, in this process: saved bytes of a step, peak RSS, median step time (and CUDA peak)."""
    import contextlib

    import torch

    from lightning_transfer.backbones.timm import TimmBackbone
    from lightning_transfer.callbacks.efficiency import SavedTensorsCounter, peak_rss_bytes
    from lightning_transfer.module import TransferModule
    from lightning_transfer.registry import STRATEGIES as REGISTRY

    torch.manual_seed(0)
    backbone = TimmBackbone("vit_base_patch16_224", pretrained=False)
    module = TransferModule(backbone, REGISTRY.get(name)(**init_args), num_classes=10).to(device).train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    x, y = torch.randn(batch, 3, 224, 224, device=device), torch.arange(batch, device=device) % 10
    cuda = device == "cuda"
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rss_before = peak_rss_bytes()
    times, saved, cuda_peak = [], 0, 0
    for step in range(steps + 1):  # step 0 warms up (allocator, optimizer state)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with SavedTensorsCounter(exclude=module) as counter, autocast:
            logits = module(x)
            loss = module.adaptation.loss(logits, (x, y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
            saved = counter.bytes
            cuda_peak = max(cuda_peak, torch.cuda.max_memory_allocated() if cuda else 0)
    counts = module.parameter_counts()
    return {"saved_bytes": saved, "peak_rss": peak_rss_bytes(), "rss_added": peak_rss_bytes() - rss_before,
            "step_s": statistics.median(times), "trainable": counts["trainable"], "cuda_peak": cuda_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per strategy (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="forward and loss under bf16 autocast")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one label, print JSON
    args = parser.parse_args()
    if args.one:
        name, init_args = STRATEGIES[args.one]
        print(json.dumps(measure(name, init_args, args.steps, args.batch, args.device, args.bf16)))
        return

    import torch

    from lightning_transfer.registry import STRATEGIES as REGISTRY

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible (torch.cuda.is_available() is False)")
    where = (f"CUDA ({torch.cuda.get_device_name()})" if args.device == "cuda"
             else f"CPU ({torch.get_num_threads()} threads)")
    print(f"vit_base_patch16_224 (random weights), batch {args.batch}, 224x224, {where}"
          f"{', bf16 autocast' if args.bf16 else ', fp32'}, median of {args.steps} steps after 1 warm-up; "
          f"each strategy in its own process")
    results: dict[str, dict[str, float]] = {}
    cuda = args.device == "cuda"
    header = (f"{'strategy':<13} {'trainable':>11} {'saved MB':>9} {'x full':>7} "
              + (f"{'CUDA peak MB':>13} {'x full':>7} " if cuda else
                 f"{'peak RSS MB':>12} {'x full':>7} {'RSS added MB':>13} {'x full':>7} ")
              + f"{'step ms':>8} {'x full':>7}")
    print(header + "\n" + "-" * len(header), flush=True)
    for label, (name, _) in STRATEGIES.items():  # FullFinetune first: each row prints as soon as it is measured
        if REGISTRY.find(name) is None:
            print(f"  {label}: not registered in lightning_transfer.strategies, skipped")
            continue
        out = subprocess.run([sys.executable, __file__, "--one", label, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--device", args.device]
                             + (["--bf16"] if args.bf16 else []), capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            print(f"  {label}: failed\n{out.stderr[-2000:]}")
            continue
        r = results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["FullFinetune"]
        memory = (f"{r['cuda_peak'] / 2**20:>13.0f} {r['cuda_peak'] / base['cuda_peak']:>7.3f} " if cuda else
                  f"{r['peak_rss'] / 2**20:>12.0f} {r['peak_rss'] / base['peak_rss']:>7.3f} "
                  f"{r['rss_added'] / 2**20:>13.0f} {r['rss_added'] / max(base['rss_added'], 1):>7.3f} ")
        print(f"{label:<13} {int(r['trainable']):>11,} {r['saved_bytes'] / 2**20:>9.1f} "
              f"{r['saved_bytes'] / base['saved_bytes']:>7.3f} {memory}{r['step_s'] * 1e3:>8.1f} "
              f"{r['step_s'] / base['step_s']:>7.3f}", flush=True)
    checks = [("VQT T=1", "saved", 0.15), ("VQT T=10", "saved", 0.15), ("SHERL", "saved", 0.25),
              ("VQT T=1", "step", 0.6), ("VQT T=10", "step", 0.6), ("SHERL", "step", 0.6)]
    print("\ntargets:")
    for label, kind, limit in checks:
        if label in results:
            key = "saved_bytes" if kind == "saved" else "step_s"
            ratio = results[label][key] / base[key]
            verdict = "ok" if ratio <= limit else "MISSED"
            print(f"  {label:<9} {kind:<5} {ratio:.3f}x full (target <= {limit}): {verdict}")


if __name__ == "__main__":
    main()
