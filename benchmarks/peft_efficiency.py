"""Costs of parameter-efficient strategies on a ViT-B/16-shaped model, merged-LoRA throughput, digits few-shot accuracy.

Three parts, each measured side by side in one run (ratios, never absolute targets):

* ``efficiency``: for FullFinetune, LinearProbe, LoRA (r=8, qv), Adapter (parallel, 64) and BitFit on a randomly
  initialised ``vit_base_patch16_224`` (only the sizes matter): trainable parameters, checkpoint MiB (the file the
  module writes), AdamW state bytes after one step, bytes saved for backward per step (the efficiency callback's
  :class:`SavedTensorsCounter`) and the median training-step time relative to FullFinetune.
* ``merged``: inference throughput of the LoRA-merged backbone over the plain backbone (interleaved rounds).
* ``digits``: target few-shot accuracy (digits 5-9, 5 shots, 3 data seeds) of LoRA and Adapter next to
  FullFinetune and LinearProbe, from the quickstart's source model; learning rate picked per strategy from a small
  grid by validation accuracy.

    .venv/bin/python benchmarks/peft_efficiency.py [--parts efficiency merged digits] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from fewshot_accuracy import source_backbone  # same folder: the quickstart source ViT, built once

REPO = Path(__file__).resolve().parents[1]
VIT_B = {"model_name": "vit_base_patch16_224"}
EFFICIENCY = {  # label -> (class name, init_args)
    "FullFinetune": ("FullFinetune", {}),
    "LinearProbe": ("LinearProbe", {}),
    "LoRA r=8 qv": ("LoRA", {"r": 8, "alpha": 8, "target_modules": "qv"}),
    "Adapter par. 64": ("Adapter", {"bottleneck": 64, "placement": "parallel"}),
    "BitFit": ("BitFit", {}),
}
DIGITS = {
    "FullFinetune": ("FullFinetune", {}),
    "LinearProbe": ("LinearProbe", {}),
    "LoRA r=8 qv": ("LoRA", {"r": 8, "alpha": 8}),
    "Adapter par. 16": ("Adapter", {"bottleneck": 16, "placement": "parallel"}),
}


def _module(label: str, table: dict, backbone: Any, num_classes: int = 10, **kw: Any) -> Any:
    from lightning_transfer.module import TransferModule
    from lightning_transfer.registry import STRATEGIES

    name, init_args = table[label]
    return TransferModule(backbone, STRATEGIES.get(name)(**init_args), num_classes=num_classes, **kw)


def _checkpoint_bytes(module: Any) -> int:
    """Size of the checkpoint file the module writes (state through on_save_checkpoint + hyperparameters)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer().nbytes


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def efficiency(device: str, batch: int, steps: int) -> None:
    from lightning_transfer.backbones.timm import TimmBackbone
    from lightning_transfer.callbacks.efficiency import SavedTensorsCounter

    print(f"\n== ViT-B/16-shaped model (random weights), batch {batch} at 224x224, {device}, AdamW ==")
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.arange(batch, device=device) % 10
    rows, times = [], {}
    for label in EFFICIENCY:
        torch.manual_seed(0)
        module = _module(label, EFFICIENCY, TimmBackbone(**VIT_B)).to(device)
        ckpt = _checkpoint_bytes(module)
        optimizer = torch.optim.AdamW(module.adaptation.param_groups(module.backbone, module.head), lr=1e-4)
        module.train()
        step_times, saved = [], 0
        for step in range(steps + 1):  # step 0 warms up (and is where the saved bytes are counted)
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with SavedTensorsCounter(exclude=module) as counter:
                loss = module.adaptation.loss(module(x), (x, y))
            loss.backward()
            optimizer.step()
            _sync(device)
            if step == 0:
                saved = counter.bytes
            else:
                step_times.append(time.perf_counter() - start)
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        times[label] = statistics.median(step_times)
        rows.append((label, module.parameter_counts()["trainable"], ckpt, state, saved))
        del module, optimizer
    print(f"{'strategy':<16} {'trainable':>12} {'ckpt MiB':>9} {'optim MiB':>9} {'saved-for-bwd MiB':>17} "
          f"{'step time / full':>17}")
    for label, trainable, ckpt, state, saved in rows:
        print(f"{label:<16} {trainable:>12,} {ckpt / 2**20:>9.2f} {state / 2**20:>9.2f} {saved / 2**20:>17.1f} "
              f"{times[label] / times['FullFinetune']:>17.2f}")
    full_ckpt = rows[0][2]
    lora_ckpt = next(r[2] for r in rows if r[0].startswith("LoRA"))
    print(f"LoRA checkpoint / FullFinetune checkpoint = {lora_ckpt / full_ckpt:.4f} (issue target < 0.05)")


def merged(device: str, batch: int, rounds: int) -> None:
    from lightning_transfer.backbones.timm import TimmBackbone

    print(f"\n== merged LoRA (r=8, qv) vs plain ViT-B/16 inference, batch {batch}, {device} ==")
    torch.manual_seed(0)
    module = _module("LoRA r=8 qv", EFFICIENCY, TimmBackbone(**VIT_B))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking update, so the merge is not a no-op
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    plain = TimmBackbone(**VIT_B).eval().to(device)
    fused = TimmBackbone(**VIT_B)
    fused.model.load_state_dict(module.adaptation.merged_backbone_state(module.backbone), strict=True)
    fused = fused.eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        diff = (fused(x) - module.eval().to(device).backbone(x)).abs().max().item()
        elapsed: dict[str, list[float]] = {"plain": [], "merged": []}
        for r in range(rounds + 1):  # interleaved so that load changes hit both alike; round 0 warms up
            for name, model in (("plain", plain), ("merged", fused)):
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                if r:
                    elapsed[name].append(time.perf_counter() - start)
    # medians: robust to other processes stealing the CPU for a round
    plain_s, merged_s = statistics.median(elapsed["plain"]), statistics.median(elapsed["merged"])
    print(f"max |merged - adapted| feature difference: {diff:.2e}")
    print(f"plain  {batch / plain_s:8.2f} img/s (median of {rounds} rounds)")
    print(f"merged {batch / merged_s:8.2f} img/s (median of {rounds} rounds)")
    print(f"merged / plain throughput = {plain_s / merged_s:.3f} (issue target >= 0.95)")


def _fit_digits(label: str, lr: float, seed: int, source: str, shots: int, epochs: int) -> tuple[float, float]:
    from lightning.pytorch import Trainer, seed_everything

    from lightning_transfer.backbones.timm import TimmBackbone
    from lightning_transfer.datamodules import Digits

    seed_everything(seed, verbose=False)
    backbone = TimmBackbone("test_vit", checkpoint_path=source, model_kwargs={"img_size": 8, "patch_size": 2,
                                                                              "in_chans": 1},
                            data_config={"mean": [0.3], "std": [0.35]})
    module = _module(label, DIGITS, backbone, num_classes=5,
                     optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=0.05))
    dm = Digits(task="target", target_classes=[5, 6, 7, 8, 9], num_shots=shots, seed=seed, batch_size=25)
    dm.set_data_config(backbone.data_config())
    trainer = Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, check_val_every_n_epoch=epochs)
    trainer.fit(module, datamodule=dm)
    val = float(trainer.callback_metrics["val/acc"])
    return val, float(trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"])


def digits(source: str | None, shots: int, epochs: int, seeds: list[int], lrs: list[float],
           labels: list[str]) -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    path = source_backbone(source)
    shown = Path(path).relative_to(REPO) if Path(path).is_relative_to(REPO) else path
    print(f"\n== digits 5-9, {shots} shots/class, data seeds {seeds}, {epochs} epochs, source model {shown} ==")
    print(f"lr per strategy picked from {lrs} by validation accuracy summed over the seeds")
    print(f"{'strategy':<16} {'lr':>7} {'test acc mean':>14} {'std':>6}  per seed")
    for label in labels:
        results = {lr: [_fit_digits(label, lr, s, path, shots, epochs) for s in seeds] for lr in lrs}
        best = max(lrs, key=lambda lr: (sum(v for v, _ in results[lr]), -lr))
        tests = [t for _, t in results[best]]
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        print(f"{label:<16} {best:>7g} {statistics.mean(tests):>14.1%} {spread:>6.1%}  "
              + " ".join(f"{t:.1%}" for t in tests), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["efficiency", "merged", "digits"],
                        choices=["efficiency", "merged", "digits"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="ViT-B batch size (efficiency and merged parts)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per strategy")
    parser.add_argument("--rounds", type=int, default=15, help="timed inference rounds per model")
    parser.add_argument("--source", help="exported digits source backbone (backbone.safetensors)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--strategies", nargs="+", default=list(DIGITS), choices=list(DIGITS),
                        help="digits part: which strategies, in this order")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    if "efficiency" in args.parts:
        efficiency(args.device, args.batch, args.steps)
    if "merged" in args.parts:
        merged(args.device, args.batch, args.rounds)
    if "digits" in args.parts:
        digits(args.source, args.shots, args.epochs, args.seeds, args.lrs, args.strategies)


if __name__ == "__main__":
    main()
