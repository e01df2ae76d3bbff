"""Why a strategy wins or loses in the few-shot benchmark: training and test accuracy per seed, and SHERL's gate.

Trains exactly as ``fewshot_accuracy.py`` does (same source model, data, loop and optimizer) at the settings given,
then prints, per data seed, the accuracy on the K training shots, on the test split, and for SHERL the opening of
its gate ``tanh(gamma / tau)`` on the copy of the frozen features (0: the late block reads only the early route).

    .venv/bin/python benchmarks/fewshot_diagnostics.py --source <backbone.safetensors> --shots 10 \\
        LinearProbe:0.03 'SHERL:0.001' 'SHERL:0.001:{"projection": "linear_norm", "reduction": 1}'
"""

from __future__ import annotations

import argparse
import json

import torch
from fewshot_accuracy import _accuracy, source_backbone, train


def _parse(parser: argparse.ArgumentParser, setting: str) -> tuple[str, float, dict]:
    """``CLASS:LR`` or ``CLASS:LR:JSON_INIT_ARGS`` -> (class name, lr, init_args); a clear error otherwise."""
    name, _, rest = setting.partition(":")
    lr, _, extra = rest.partition(":")
    try:
        init_args = json.loads(extra) if extra else {}
        if not name or not isinstance(init_args, dict):
            raise ValueError
        return name, float(lr), init_args
    except ValueError:
        parser.error(f"setting {setting!r}: expected CLASS:LR or CLASS:LR:JSON_OBJECT, e.g. "
                     """'SHERL:0.001:{"late_blocks": 2}'""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="CLASS:LR or CLASS:LR:JSON_INIT_ARGS, e.g. SHERL:0.001")
    parser.add_argument("--source", help="exported source backbone (backbone.safetensors)")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [_parse(parser, setting) for setting in args.settings]  # every one checked before any training
    path = source_backbone(args.source)
    print(f"digits 5-9, {args.shots} shots/class, {args.epochs} epochs, seeds {args.seeds}")
    for name, lr, init_args in settings:
        for seed in args.seeds:
            module, dm = train(name, init_args, lr, seed, path, args.shots, args.epochs)
            fit = _accuracy(module, dm.train_dataloader())
            dm.setup("test")
            test = _accuracy(module, dm.test_dataloader())
            adaptation = module.adaptation
            gate = (f"  gate {torch.tanh(adaptation.gamma / adaptation.gate_temperature).item():+.3f}"
                    if hasattr(adaptation, "gamma") else "")
            print(f"{name} lr {lr} {init_args or ''} seed {seed}: train {fit:.3f}  test {test:.3f}{gate}", flush=True)


if __name__ == "__main__":
    main()
