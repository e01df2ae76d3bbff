"""Shared plumbing of the peft-backed strategies (LoRA, PeftMethod): fused-qkv split, injection, merge, export.

peft injects its layers in place (``peft.inject_adapter_in_model``), so the backbone's ``blocks`` stay the same
module objects and every strategy that walks them keeps working. Injected layers live under the backbone with
``requires_grad=True``; the module's checkpoint therefore keeps them and drops the frozen base weights.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.strategies.base import AdaptationStrategy

# peft writes adapter weights under this prefix (PeftModel.base_model.model.<path>)
PEFT_KEY_PREFIX = "base_model.model."
# peft config fields that hold module names (full names in the backbone; the export makes them library-relative)
_MODULE_NAME_FIELDS = ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save")
# module-name suffixes of separate query / value projections (HF BERT/RoBERTa, CLIP, LLaMA-style)
_QUERY_NAMES = ("query", "q_proj", "q")
_VALUE_NAMES = ("value", "v_proj", "v")


class FusedQKV(nn.Module):
    """A fused ``qkv`` Linear split into ``q``, ``k``, ``v`` Linears whose outputs are concatenated.

    Same function as the fused layer (output rows ``[q; k; v]``, as timm's ``Attention`` reshapes them), but LoRA
    can now target ``q`` and ``v`` alone, so the ``k`` rows of the effective weight can never change (peft #691).
    """

    q: nn.Module
    k: nn.Module
    v: nn.Module

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        dim = fused.out_features // 3
        self.in_features, self.out_features = fused.in_features, fused.out_features
        for i, name in enumerate(("q", "k", "v")):
            part = nn.Linear(fused.in_features, dim, bias=fused.bias is not None,
                             device=fused.weight.device, dtype=fused.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(fused.weight[i * dim:(i + 1) * dim])  # (D, D_in)
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * dim:(i + 1) * dim])
            part.requires_grad_(fused.weight.requires_grad)
            setattr(self, name, part)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)  # (..., 3 * D)

    def fused(self) -> nn.Linear:
        """The equivalent single Linear (only valid once adapters are merged and unloaded)."""
        parts = [p for p in (self.q, self.k, self.v) if isinstance(p, nn.Linear)]
        if len(parts) != 3:
            raise RuntimeError("merge and unload the adapters before fusing q, k, v back")
        out = nn.Linear(self.in_features, self.out_features, bias=self.q.bias is not None,
                        device=self.q.weight.device, dtype=self.q.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([p.weight for p in parts]))  # (3D, D_in)
            if out.bias is not None:
                out.bias.copy_(torch.cat([p.bias for p in parts if p.bias is not None]))
        return out


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def in_image_tower(backbone: Backbone, name: str) -> bool:
    """Whether module ``name`` is inside the tower that ``backbone.forward`` runs (not CLIP's unused text tower)."""
    prefix = backbone.image_tower_prefix
    return not prefix or name == prefix or name.startswith(prefix + ".")


def qv_targets(backbone: Backbone) -> list[str]:
    """Module names of the query and value projections; fused ``qkv`` Linears are split first (:class:`FusedQKV`).

    Returns full module names (exact matches for peft), in the image tower only: an adapter in CLIP's text tower
    would never get a gradient (and DDP refuses unused parameters). Raises when there are no attention projections.
    """
    names: list[str] = []
    for name, module in list(backbone.named_modules()):
        if not in_image_tower(backbone, name):
            continue
        leaf = name.rpartition(".")[2]
        if leaf == "qkv" and isinstance(module, nn.Linear):
            attn, _ = _parent(backbone, name)
            if hasattr(attn, "q_bias") or hasattr(attn, "v_bias"):  # BEiT/EVA read qkv.weight directly
                raise ValueError(f"{name} is used through its weight with separate q/v biases (BEiT/EVA style), so "
                                 "it cannot be split: pass explicit target_modules, e.g. ['attn.qkv']")
            parent, child = _parent(backbone, name)
            setattr(parent, child, FusedQKV(module))
            names += [f"{name}.q", f"{name}.v"]
        elif isinstance(module, FusedQKV):  # split by an earlier attach (idempotence)
            names += [f"{name}.q", f"{name}.v"]
        elif isinstance(module, nn.Linear) and (leaf in _QUERY_NAMES or leaf in _VALUE_NAMES):
            if not name.endswith(tuple(f"qkv.{x}" for x in ("q", "k", "v"))):
                names.append(name)
    if not names:
        raise ValueError(
            f"target_modules='qv' found no attention query/value projections in {backbone.identity()}: pass "
            f"target_modules as a list of module names (the backbone suggests {backbone.lora_target_modules or 'none'})"
        )
    return sorted(set(names))


def block_of_module(backbone: Backbone) -> dict[str, int]:
    """Module name -> index of the block containing it (modules outside the blocks are absent)."""
    out: dict[str, int] = {}
    for i, block in enumerate(backbone.blocks):
        inside = {id(m) for m in block.modules()}
        out.update({name: i for name, m in backbone.named_modules() if id(m) in inside})
    return out


def expand_targets(backbone: Backbone, targets: list[str], layers: list[int] | None, what: str) -> list[str]:
    """Full names of the modules matching ``targets`` (exact names or suffixes), restricted to blocks ``layers``.

    Only modules of the image tower count (:func:`in_image_tower`); a target that matches nothing else is an error.
    """
    if not targets:  # e.g. IA3's feedforward_modules default: no module
        return []
    check_targets_exist(backbone, targets, what)

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    tower = [(n, m) for n, m in backbone.named_modules() if in_image_tower(backbone, n)]
    outside = [t for t in targets if not any(matches(n, t) for n, _ in tower)]
    if outside:
        prefix = backbone.image_tower_prefix
        raise ValueError(f"{what} {outside} match only modules outside the image tower ({prefix}) of "
                         f"{backbone.identity()}, which image classification never runs: name modules under {prefix}")
    # only leaf layers: a suffix such as ``conv1`` must not catch a container (timm's deep-stem ``conv1`` Sequential)
    names = [n for n, m in tower if any(matches(n, t) for t in targets) and not any(True for _ in m.children())]
    if not names:
        raise ValueError(f"{what} {targets} match only container modules of {backbone.identity()}: name layers "
                         "(Linear/Conv) instead")
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < backbone.depth]
        if bad:
            raise ValueError(f"layers_to_transform {bad} out of range: the backbone has blocks 0..{backbone.depth - 1}")
        block_of = block_of_module(backbone)
        names = [n for n in names if block_of.get(n) in layers]
        if not names:
            raise ValueError(f"{what} {targets} match no module inside blocks layers_to_transform={layers} of "
                             f"{backbone.identity()}: name modules of those blocks, or drop layers_to_transform")
    return sorted(names)


def check_targets_exist(backbone: Backbone, targets: list[str], what: str) -> None:
    """Fail before peft does, with the module names that exist."""
    names = [n for n, _ in backbone.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.split(".", 1)[-1].split(".", 2)[-1] for n in names if n})[:12]
        raise ValueError(f"{what} {missing} match no module of {backbone.identity()}; module names end with e.g. "
                         f"{leaves}")


def injected_layers(root: nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in root.named_modules() if isinstance(m, BaseTunerLayer)]


def set_injected_train_mode(backbone: Backbone, mode: bool) -> None:
    """The frozen backbone runs in eval mode; the injected layers (their dropout) follow the module's mode."""
    for _, layer in injected_layers(backbone):
        layer.train(mode)
        layer.get_base_layer().eval()


def merged_copy(backbone: Backbone) -> Backbone:
    """A deep copy of ``backbone`` with every peft layer merged into its base weight and removed."""
    model = copy.deepcopy(backbone)
    for name, layer in reversed(injected_layers(model)):
        layer.merge(safe_merge=True)
        parent, child = _parent(model, name)
        setattr(parent, child, layer.get_base_layer())
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedQKV):
            parent, child = _parent(model, name)
            setattr(parent, child, module.fused())
    model.__dict__.pop("peft_config", None)
    return model


def library_root(backbone: Backbone) -> tuple[nn.Module, str]:
    """The wrapped library model (``backbone.model``: timm or transformers) and its name prefix in the backbone."""
    model = getattr(backbone, "model", None)
    return (model, "model.") if isinstance(model, nn.Module) else (backbone, "")


def _fuse_qv_lora(state: dict[str, Tensor], out_dim: int) -> dict[str, Tensor]:
    """LoRA on split ``qkv.q``/``qkv.v`` -> an exactly equivalent rank-2r LoRA on the fused ``qkv`` Linear.

    ``A = [A_q; A_v]`` (2r, D_in) and ``B`` (3D, 2r) holds ``B_q`` in the q rows, zeros in the k rows and ``B_v``
    in the v rows, so ``B A = [B_q A_q; 0; B_v A_v]``.
    """
    out = {k: v for k, v in state.items() if ".qkv.q." not in k and ".qkv.v." not in k}
    stems = sorted({k.split(".qkv.q.")[0] for k in state if ".qkv.q." in k})
    for stem in stems:
        a_q, b_q = state[f"{stem}.qkv.q.lora_A.weight"], state[f"{stem}.qkv.q.lora_B.weight"]
        a_v, b_v = state[f"{stem}.qkv.v.lora_A.weight"], state[f"{stem}.qkv.v.lora_B.weight"]
        r, dim = a_q.shape[0], out_dim // 3
        b = torch.zeros(out_dim, 2 * r, dtype=b_q.dtype)  # (3D, 2r)
        b[:dim, :r], b[2 * dim:, r:] = b_q, b_v
        out[f"{stem}.qkv.lora_A.weight"] = torch.cat([a_q, a_v])  # (2r, D_in)
        out[f"{stem}.qkv.lora_B.weight"] = b
    return out


def save_peft_adapter(backbone: Backbone, config: Any, output: Path) -> list[Path]:
    """Write peft's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) for the library model.

    Keys are relative to the library model (``backbone.model``), so ``PeftModel.from_pretrained(model, output)``
    on a fresh timm/transformers model of the same architecture loads them. A LoRA on split fused ``qkv`` layers is
    rewritten as the equivalent rank-2r LoRA on the original fused layers.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root, prefix = library_root(backbone)
    state = {k[len(prefix):]: v for k, v in get_peft_model_state_dict(backbone).items() if k.startswith(prefix)}
    config = copy.deepcopy(config)
    split = sorted({n.rsplit(".", 1)[0] for n in state if ".qkv.q." in n})
    if split:
        if type(config).__name__ != "LoraConfig":
            raise ValueError(f"peft export of {type(config).__name__} on a split fused qkv layer is not supported: "
                             "export with --format merged, or train with explicit target_modules=['attn.qkv']")
        if getattr(config, "use_dora", False):
            raise ValueError("peft export of DoRA on a split fused qkv layer is not supported: export with "
                             "--format merged, or train with explicit target_modules=['attn.qkv']")
        out_dim = next(m.out_features for n, m in root.named_modules() if isinstance(m, FusedQKV))
        state = _fuse_qv_lora(state, out_dim)
        config.target_modules = sorted({t.replace(".qkv.q", ".qkv").replace(".qkv.v", ".qkv")
                                        for t in config.target_modules})
        # scaling alpha / r (or alpha / sqrt(r)) must stay the same at rank 2r
        config.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
        config.r = 2 * config.r
    for key in _MODULE_NAME_FIELDS:  # names relative to the library model, in every field that holds them
        names = getattr(config, key, None)
        if isinstance(names, (set, list)):
            setattr(config, key, sorted(t[len(prefix):] if t.startswith(prefix) else t for t in names))
    output.mkdir(parents=True, exist_ok=True)
    config.inference_mode = True
    weights = output / "adapter_model.safetensors"
    save_file({PEFT_KEY_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}, str(weights))
    config_path = output / "adapter_config.json"
    config_path.write_text(json.dumps(config.to_dict(), indent=2, default=_json_default))
    return [config_path, weights]


def _json_default(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    return str(value)


class PeftInjected(AdaptationStrategy):
    """Shared surface of strategies whose modules peft injects into the backbone (LoRA, PeftMethod).

    Subclasses set ``self.peft_config`` in ``_attach``; training mode, merged export and peft export follow from it.
    """

    peft_config: Any

    def set_train_mode(self, backbone: Backbone, head: nn.Module | None, mode: bool) -> None:
        super().set_train_mode(backbone, head, mode)
        set_injected_train_mode(backbone, mode)

    def merged_backbone_state(self, backbone: Backbone) -> dict[str, Tensor]:
        """The backbone's weights with the injected modules merged in, in the layout ``checkpoint_path`` loads."""
        return merged_copy(backbone).export_state_dict()

    def save_peft(self, backbone: Backbone, output: Path) -> list[Path]:
        """peft's adapter format for the wrapped library model (``PeftModel.from_pretrained`` loads it)."""
        return save_peft_adapter(backbone, self.peft_config, output)
