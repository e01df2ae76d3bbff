"""Cost of CoOp against zero-shot CLIP and CoCoOp at the same batch, side by side in one run (CPU).

Two random-weight Hugging Face CLIPs: the tests' tiny CLIP (width 32, depth 2, 16x16 images, context 32) and a
ViT-B/16-shaped one (vision 768 wide x 12 blocks at 224x224, text 512 x 12 with a 77-token context, projection
512; the same shapes as ``openai/clip-vit-base-patch16``). For each: median step time of zero-shot inference
(text features cached), of a CoOp training step (M = 16; forward, backward, SGD) and of a CoCoOp training step
(M = 4, meta-net), the bytes autograd saves for backward in one step (parameters excluded), and checkpoint sizes
(what ``TransferModule`` writes: the frozen CLIP is omitted) against the whole CLIP state dict.

    .venv/bin/python benchmarks/coop_cost.py [--batch 8] [--classes 10] [--steps 2] [--tiny-steps 20] \
        [--sizes tiny,vit_b16]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_transfer.backbones.hf_clip import HFCLIPBackbone  # noqa: E402
from lightning_transfer.callbacks.efficiency import SavedTensorsCounter  # noqa: E402
from lightning_transfer.module import TransferModule  # noqa: E402
from lightning_transfer.strategies.cocoop import CoCoOp  # noqa: E402
from lightning_transfer.strategies.coop import CoOp  # noqa: E402
from lightning_transfer.strategies.zeroshot_clip import ZeroShotCLIP  # noqa: E402
from tests.helpers.tiny_clip import tiny_clip_dir  # noqa: E402

VIT_B16 = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
    "projection_dim": 512,
}


def build(size: str) -> HFCLIPBackbone:
    if size == "tiny":
        return HFCLIPBackbone(model_name_or_path=tiny_clip_dir())
    tok_dir = tiny_clip_dir()  # any CLIP BPE tokenizer: the ids only need to fit the vocabulary
    tok = HFCLIPBackbone(model_name_or_path=tok_dir).tokenizer
    config = {**VIT_B16, "text_config": {**VIT_B16["text_config"], "eos_token_id": tok.eos_token_id,
                                         "bos_token_id": tok.bos_token_id, "pad_token_id": tok.eos_token_id}}
    return HFCLIPBackbone(config=config, tokenizer=tok_dir)


def checkpoint_bytes(module: TransferModule) -> int:
    kept, _ = module.checkpoint_format.split(module, module.state_dict())  # what on_save_checkpoint keeps
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    return buffer.tell()


def measure(module: TransferModule, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    trains = module.parameter_counts()["trainable"] > 0
    if not trains:  # zero-shot: inference only, text features cached by the first call
        module.eval()
        with torch.no_grad():
            start = time.perf_counter()
            module(x)
            first = time.perf_counter() - start
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - start)
        return {"time": statistics.median(times), "first": first, "saved": 0.0}
    module.train()
    optimizer = torch.optim.SGD(module.adaptation.param_groups(module.backbone, None), lr=0.002, momentum=0.9)
    times, saved = [], 0
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        with SavedTensorsCounter(exclude=module) as counter:
            loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
        saved = counter.bytes
    return {"time": statistics.median(times), "first": float("nan"), "saved": float(saved)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="timed steps on the ViT-B/16-shaped CLIP")
    parser.add_argument("--tiny-steps", type=int, default=20, help="timed steps on the tiny CLIP (noisier)")
    parser.add_argument("--sizes", default="tiny,vit_b16")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = [str(i) for i in range(args.classes)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.classes} classes, "
          f"median of {args.tiny_steps} (tiny) / {args.steps} (vit_b16) steps")
    for size in args.sizes.split(","):
        backbone = build(size)
        c, h, w = backbone.data_config()["input_size"]
        x, y = torch.randn(args.batch, c, h, w), torch.arange(args.batch) % args.classes
        clip_bytes = io.BytesIO()
        torch.save(backbone.model.state_dict(), clip_bytes)
        rows = {}
        for label, strategy in (("zero-shot", ZeroShotCLIP()), ("CoOp M=16", CoOp(n_ctx=16)),
                                ("CoCoOp M=4", CoCoOp(n_ctx=4, ctx_init=None))):
            module = TransferModule(backbone, strategy, num_classes=args.classes, class_names=names)
            steps = args.tiny_steps if size == "tiny" else args.steps
            rows[label] = {**measure(module, x, y, steps), "ckpt": checkpoint_bytes(module),
                           "trainable": module.parameter_counts()["trainable"]}
        print(f"\n== {size}: CLIP {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M params, "
              f"input {c}x{h}x{w}, full CLIP state dict {clip_bytes.tell() / 2**20:.2f} MiB")
        print(f"{'strategy':<12} {'trainable':>9} {'step s':>8} {'x zero-shot':>11} {'x CoOp':>7} "
              f"{'saved MiB':>9} {'x CoOp':>7} {'ckpt KiB':>9}")
        coop = rows["CoOp M=16"]
        base = rows["zero-shot"]["time"]
        for label, r in rows.items():
            saved_ratio = r["saved"] / coop["saved"] if coop["saved"] else float("nan")
            print(f"{label:<12} {r['trainable']:>9} {r['time']:>8.3f} {r['time'] / base:>11.1f} "
                  f"{r['time'] / coop['time']:>7.2f} {r['saved'] / 2**20:>9.1f} {saved_ratio:>7.2f} "
                  f"{r['ckpt'] / 1024:>9.1f}")
        print(f"zero-shot first call (builds and caches the text features): {rows['zero-shot']['first']:.3f} s")


if __name__ == "__main__":
    main()
