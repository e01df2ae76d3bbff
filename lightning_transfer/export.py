"""Export a trained checkpoint: the backbone's weights with the adaptation folded in, plus the head."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from lightning_transfer.checkpointing import read_checkpoint
from lightning_transfer.module import TransferModule


def load_module(ckpt_path: str) -> TransferModule:
    """Rebuild a TransferModule from a checkpoint's hyperparameters and load its weights (weights_only)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    checkpoint = read_checkpoint(path)  # a file that is no checkpoint is named, not a traceback
    missing = [k for k in ("state_dict", "hyper_parameters") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ValueError(f"{ckpt_path!r} is not a checkpoint written by fit (it has no {' or '.join(missing)}): pass "
                         "<run folder>/checkpoints/last.ckpt or another .ckpt that fit wrote")
    del checkpoint
    return TransferModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)


FORMATS = ("merged", "peft")


def export_checkpoint(ckpt_path: str, fmt: str, output: str) -> list[Path]:
    """Write the export, ``head.safetensors`` and ``export.json`` into ``output``.

    ``merged``: ``backbone.safetensors``, the backbone's weights with the adaptation folded in (loadable as
    ``checkpoint_path``). ``peft``: peft's adapter files (``adapter_config.json``, ``adapter_model.safetensors``)
    for strategies that define ``save_peft`` (LoRA, PeftMethod).
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {output!r} is a file; give a new folder (nothing is overwritten)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {output!r} is not empty; choose a new one (nothing is overwritten)")
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    module = load_module(ckpt_path)
    name = type(module.adaptation).__name__
    merge = getattr(module.adaptation, "merged_backbone_state", None)
    own = list(module.adaptation.state_dict())
    # VQT's query tokens, SHERL's projections, CoOp's context: no backbone weight can hold them, in either format
    outside = None if merge is not None or not own else (
        f"{name} keeps trained weights outside the backbone ({', '.join(own[:4])}{', ...' if len(own) > 4 else ''}), "
        "which a merged backbone cannot hold: exported without them, the backbone and head would be another model. "
        "Use the checkpoint itself (test/predict --ckpt_path, or TransferModule.load_from_checkpoint)")
    if fmt == "peft":
        save_peft = getattr(module.adaptation, "save_peft", None)
        if save_peft is None:
            raise ValueError(f"{name} is not a peft method, so it has no peft adapter format; "
                             + (outside or "export with --format merged"))
        written = save_peft(module.backbone, out)
    else:
        if outside is not None:
            raise ValueError(outside)
        backbone_state = merge(module.backbone) if merge is not None else module.backbone.export_state_dict()
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "backbone.safetensors"]
        save_file({k: v.detach().cpu().contiguous() for k, v in backbone_state.items()}, str(written[0]))
    if module.head is not None:
        written.append(out / "head.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in module.head.state_dict().items()}, str(written[-1]))
    meta = {"format": fmt, "source_checkpoint": str(ckpt_path), "backbone": module.backbone.init_config(),
            "adaptation": module.adaptation.init_config(), "num_classes": module.num_classes,
            "class_names": module.class_names}
    written.append(out / "export.json")
    written[-1].write_text(json.dumps(meta, indent=2))
    return written
