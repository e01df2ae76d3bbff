"""Every registered strategy (each contract case) takes one optimizer step under mixed precision on a GPU.

Each run fits 2 accumulated batches (one step) with gradient clipping on the tiny test models and Digits, checks that
the loss is finite, trainable parameters moved and frozen ones did not, and records the peak CUDA memory.
``scripts/gpu_check.sh`` runs this; ``--device cpu`` is a dry run of the same code (bf16 only) for machines without
a GPU.

    python scripts/gpu_check.py --device cuda --precision bf16-mixed 16-mixed
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the contract cases live in tests/


def _rows(strategies: list[str] | None) -> list[tuple[str, dict, str, str]]:
    from tests.strategies.test_contract import _params

    rows = []
    for param in _params():
        name, case, kind = param.values
        if strategies is None or name in strategies:
            rows.append((name, case, kind, param.id))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed", "16-mixed"])
    parser.add_argument("--strategies", default=None, help="comma-separated registry names (default: all)")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): skipped")
        return 0
    torch.set_float32_matmul_precision("high")
    from tests.helpers.precision import one_step

    names = args.strategies.split(",") if args.strategies else None
    rows = _rows(names)
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    header = f"{'case':<24} {'precision':<11} {'loss':>8} {'grad norm':>10} {'peak MiB':>9}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    start = time.perf_counter()
    for name, case, kind, case_id in rows:
        for precision in args.precision:
            try:
                result = one_step(name, case, kind, accelerator=args.device, precision=precision)
                losses = result["losses"]
                ok = bool(losses) and all(math.isfinite(x) for x in losses) and not result["frozen_changed"]
                ok = ok and (result["trainable_changed"] or _trains_nothing(name))
                status = "ok" if ok else f"FAILED {result}"
                if ok and result.get("skipped_steps"):
                    status += f" (fp16 loss scaler skipped {result['skipped_steps']} of {result['steps']} steps)"
                loss = f"{losses[-1]:8.4f}" if losses else "       -"
                print(f"{case_id:<24} {precision:<11} {loss} {result['grad_norm']:10.4f} "
                      f"{result['peak_mib']:9.1f}  {status}", flush=True)
            except Exception as error:  # report every case, then fail
                ok = False
                print(f"{case_id:<24} {precision:<11} {'':>8} {'':>10} {'':>9}  ERROR {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200]}", flush=True)
                traceback.print_exc(limit=-3, file=sys.stderr)
            failures += not ok
    print(f"{len(rows) * len(args.precision) - failures} passed, {failures} failed in "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


def _trains_nothing(name: str) -> bool:
    from lightning_transfer.registry import STRATEGIES

    return STRATEGIES.get(name).trains_nothing


if __name__ == "__main__":
    sys.exit(main())
