"""OpenAI's CLIP ResNets (RN50, RN101, RN50x4, ...): timm's ``resnet*_clip`` image tower as a CNN Backbone, plus a
Hugging Face CLIP text tower, loaded from OpenAI/open_clip-format weights. ``transformers.CLIPModel`` has no ResNet
image tower, and RN50 is the backbone CoOp reports its main numbers on.

Image tower (timm's ``ByobNet`` with CLIP's attention-pool head), mapped onto the contract like a timm CNN:

* ``embed``: the stem (three 3x3 convs, 2x2 average pool); ``blocks``: the four stages; ``finalize``: timm's
  ``final_conv`` (an identity here).
* ``pool``: the attention pool *with* CLIP's output projection (OpenAI's ``attnpool.c_proj`` is timm's
  ``head.proj``), so ``forward`` = :meth:`CLIPResNetBackbone.encode_image` = CLIP's image features
  (B, projection_dim); a linear probe on ``forward`` is CLIP's linear-probe baseline.

Text tower: ``transformers.CLIPTextModel`` + ``text_projection`` + ``logit_scale``, with the API of
:class:`~lightning_transfer.backbones.hf_clip.CLIPTextTower` (shared with HFCLIPBackbone), so CoOp, CoCoOp and
ZeroShotCLIP run unchanged.

Weights use OpenAI's key layout (``visual.*``, ``token_embedding.weight``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final.*``, ``text_projection``, ``logit_scale``). The image keys go through timm's
own converter (``timm.models.byobnet.checkpoint_filter_fn``, the one timm loads ``resnet50_clip.openai`` with); the
text keys through :func:`openai_text_state`. The architecture is read from the tensor shapes, as OpenAI's
``build_model`` does.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone, load_into, read_state_dict
from lightning_transfer.backbones.hf_clip import CLIPTextTower, clip_data_config, load_tokenizer
from lightning_transfer.registry import register_backbone

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
# scalars OpenAI's TorchScript state dicts carry next to the weights (build_model drops them too)
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
# OpenAI resblock module -> transformers CLIPEncoderLayer module (the attention's fused in_proj is split apart)
_LAYER_MODULES = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_KEYS = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias", "logit_scale": "logit_scale"}


@dataclass(frozen=True)
class CLIPResNetConfig:
    """Sizes of an OpenAI CLIP ResNet, named as OpenAI's ``build_model`` arguments (defaults: RN50).

    The text tower has ``transformer_width // 64`` heads in every OpenAI model; ``quick_gelu`` is the text MLP's
    activation (OpenAI's models use QuickGELU; open_clip's own configs say so in ``open_clip_config.json``).
    """

    embed_dim: int = 1024
    image_resolution: int = 224
    vision_layers: tuple[int, ...] = (3, 4, 6, 3)
    vision_width: int = 64
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    quick_gelu: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CLIPResNetConfig:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown CLIPResNetBackbone config keys {unknown}; known keys: {known}")
        values = dict(values)
        if "vision_layers" in values:
            values["vision_layers"] = tuple(values["vision_layers"])
        if len(values.get("vision_layers", cls.vision_layers)) != 4:
            raise ValueError(f"vision_layers must give the block count of 4 stages, got {values['vision_layers']}")
        return cls(**values)


def infer_config(state: dict[str, Tensor], source: str) -> CLIPResNetConfig:
    """The architecture of an OpenAI-format CLIP ResNet state dict, read from its tensor shapes."""
    check_openai_resnet(state, source)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source!r} has no {key!r}, which the architecture is read from: pass a complete "
                             "OpenAI/open_clip CLIP ResNet state dict")
        return tuple(state[key].shape)

    def count(prefix: str) -> int:  # distinct block indices under prefix ("visual.layer1." -> 3 for RN50)
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    width = shape("ln_final.weight")[0]
    return CLIPResNetConfig(
        embed_dim=shape("text_projection")[1],
        # the attention pool holds (H/32 * W/32 + 1) positions
        image_resolution=round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5) * 32,
        vision_layers=tuple(count(f"visual.layer{i}.") for i in range(1, 5)),
        vision_width=shape("visual.layer1.0.conv1.weight")[0],
        context_length=shape("positional_embedding")[0],
        vocab_size=shape("token_embedding.weight")[0],
        transformer_width=width,
        transformer_heads=width // 64,
        transformer_layers=count("transformer.resblocks."),
    )


def check_openai_resnet(state: dict[str, Tensor], source: str) -> None:
    """Fail with the fix when ``state`` is not an OpenAI/open_clip CLIP ResNet (a ViT CLIP, timm's image-only file)."""
    if "visual.class_embedding" in state:
        raise ValueError(f"{source!r} is a ViT CLIP (it has visual.class_embedding): use HFCLIPBackbone, e.g. "
                         "model_name_or_path: openai/clip-vit-base-patch16")
    if "visual.layer1.0.conv1.weight" not in state:
        timm_only = "stem.conv1.conv.weight" in state
        hint = (" It looks like timm's image-only model.safetensors: use the repository's " + WEIGHTS_FILE
                if timm_only else "")
        raise ValueError(f"{source!r} is not an OpenAI/open_clip CLIP ResNet state dict (no 'visual.layer1.*' keys; "
                         "expected keys such as visual.conv1.weight, token_embedding.weight, "
                         f"transformer.resblocks.0.*).{hint}")


def openai_text_state(state: dict[str, Tensor], layers: int) -> tuple[dict[str, Tensor], set[str], list[str]]:
    """OpenAI's text-tower tensors -> this backbone's keys (``text_model.*``, ``text_projection.weight``, ...).

    Returns:
        ``(converted, used, missing)``: the converted tensors, the OpenAI keys consumed and the OpenAI keys absent.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str) -> Tensor | None:
        if key not in state:
            missing.append(key)
            return None
        used.add(key)
        return state[key]

    for src, dst in _TOP_KEYS.items():
        if (value := take(src)) is not None:
            out[dst] = value
    if (proj := take("text_projection")) is not None:
        out["text_projection.weight"] = proj.t()  # OpenAI stores (width, embed_dim) and computes x @ W
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for param in ("weight", "bias"):
            if (fused := take(f"{src}attn.in_proj_{param}")) is not None:  # (3 * width, ...) rows: q, k, v
                for name, part in zip("qkv", fused.chunk(3)):
                    out[f"{dst}self_attn.{name}_proj.{param}"] = part
            for module, hf_module in _LAYER_MODULES.items():
                if (value := take(f"{src}{module}.{param}")) is not None:
                    out[f"{dst}{hf_module}.{param}"] = value
    return out, used, missing


def read_openai_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a CLIP state dict safely (safetensors, or ``torch.load(weights_only=True)``); TorchScript is refused."""
    path = Path(path).expanduser()
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:  # a TorchScript archive holds code/ and constants.pkl
            scripted = any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
        if scripted:
            raise ValueError(
                f"{str(path)!r} is a TorchScript archive (OpenAI's original RN50.pt is one): it holds code, which is "
                f"never loaded here. Use open_clip's safetensors release instead (model_name_or_path: "
                f"timm/resnet50_clip.openai, file {WEIGHTS_FILE}), or convert it once where you trust it: "
                "torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'rn50_state_dict.pt')"
            )
    return read_state_dict(path)


def _resolve(model_name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The weights file and the open_clip config (``{}`` when absent) of a local directory or a hub repository."""
    local = Path(model_name_or_path).expanduser()
    if local.is_file():
        raise ValueError(f"model_name_or_path {model_name_or_path!r} is a file: pass it as checkpoint_path, or pass "
                         f"the directory holding {WEIGHTS_FILE}")
    if local.is_dir():
        if not (local / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{str(local)!r} has no {WEIGHTS_FILE}: put open_clip's weights file there "
                                    "(e.g. from the hub repository timm/resnet50_clip.openai) or pass checkpoint_path")
        config_file = local / CONFIG_FILE
        return local / WEIGHTS_FILE, json.loads(config_file.read_text()) if config_file.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        weights = Path(hf_hub_download(model_name_or_path, WEIGHTS_FILE))
    except Exception as err:  # offline, unknown repository, no such file: say what to do instead
        raise FileNotFoundError(
            f"could not get {WEIGHTS_FILE} from the hub repository {model_name_or_path!r} ({type(err).__name__}: "
            f"{err}). Without internet, download it once elsewhere and pass model_name_or_path=<a local directory "
            f"holding {WEIGHTS_FILE}> or checkpoint_path=<the file>"
        ) from err
    try:
        return weights, json.loads(Path(hf_hub_download(model_name_or_path, CONFIG_FILE)).read_text())
    except EntryNotFoundError:  # the config is optional
        return weights, {}


def _apply_open_clip_config(arch: CLIPResNetConfig, open_clip: dict[str, Any]) -> CLIPResNetConfig:
    """What ``open_clip_config.json`` knows that the shapes do not: the text heads and the MLP activation."""
    model_cfg = open_clip.get("model_cfg", {})
    heads = model_cfg.get("text_cfg", {}).get("heads")
    return replace(arch, transformer_heads=int(heads or arch.transformer_heads),
                   quick_gelu=bool(model_cfg.get("quick_gelu", arch.quick_gelu)))


class _CLIPResNet(nn.Module):
    """OpenAI's CLIP with a timm ResNet image tower; the text side uses ``CLIPModel``'s attribute names."""

    def __init__(self, arch: CLIPResNetConfig, tokenizer: Any) -> None:
        super().__init__()
        from timm.models.byobnet import ByoBlockCfg, ByobNet, model_cfgs
        from transformers import CLIPTextConfig, CLIPTextModel

        w = arch.vision_width  # OpenAI's ModifiedResNet: stem w/2, w/2, w; stage i: w * 2^i wide, 4x expansion
        blocks = tuple(ByoBlockCfg(type="bottle", d=d, c=w * 4 * 2**i, s=1 if i == 0 else 2, br=0.25)
                       for i, d in enumerate(arch.vision_layers))
        cfg = replace(model_cfgs["resnet50_clip"], blocks=blocks, stem_chs=(w // 2, w // 2, w), width_factor=1.0)
        # num_classes=embed_dim keeps the attention pool's output projection (CLIP's c_proj)
        self.visual = ByobNet(cfg, num_classes=arch.embed_dim, img_size=arch.image_resolution)
        text_config = CLIPTextConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.transformer_width,
            intermediate_size=4 * arch.transformer_width, num_hidden_layers=arch.transformer_layers,
            num_attention_heads=arch.transformer_heads, max_position_embeddings=arch.context_length,
            hidden_act="quick_gelu" if arch.quick_gelu else "gelu", layer_norm_eps=1e-5,
            projection_dim=arch.embed_dim, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        text = CLIPTextModel(text_config)
        # transformers < 5 wraps the transformer in CLIPTextModel.text_model; 5.x is the transformer itself
        self.text_model = getattr(text, "text_model", text)
        self.text_projection = nn.Linear(arch.transformer_width, arch.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature


@register_backbone("clip_resnet")
class CLIPResNetBackbone(CLIPTextTower, Backbone):
    """OpenAI's CLIP ResNet (RN50, RN101, RN50x4, ...): a CNN Backbone whose features are CLIP's image features,
    plus CLIP's text tower for prompts (Radford et al., 2021; arXiv:2103.00020).

    Args:
        model_name_or_path: a hub repository holding open_clip's ``open_clip_model.safetensors`` (e.g.
            ``timm/resnet50_clip.openai``; needs internet the first time) or a local directory holding that file
            (+ an optional ``open_clip_config.json``). The architecture is read from the weights.
        tokenizer: hub name or local directory of CLIP's BPE tokenizer (the same for every OpenAI CLIP).
        config: :class:`CLIPResNetConfig` sizes for a randomly initialised model (tests, cost benchmarks);
            ignored when ``model_name_or_path`` is given.
        checkpoint_path: a local CLIP state dict (``.safetensors``, or a torch file read with
            ``weights_only=True``) in OpenAI's layout or in this backbone's own (:meth:`export_state_dict`), loaded
            strictly. On its own (no ``model_name_or_path``/``config``) it must be OpenAI's layout: the
            architecture is read from it. OpenAI's TorchScript ``RN50.pt`` is refused with the way to convert it.
        data_config: overrides for the preprocessing config (``input_size``, ``mean``, ``std``, ...).
    """

    has_tokens: ClassVar[bool] = False
    final_prefixes: ClassVar[tuple[str, ...]] = ("model.visual.head.",)
    image_tower_prefix: ClassVar[str] = "model.visual"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        tokenizer: str = "openai/clip-vit-base-patch32",
        config: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if model_name_or_path is None and config is None and checkpoint_path is None:
            raise ValueError("CLIPResNetBackbone needs model_name_or_path (hub repository or local directory), "
                             "checkpoint_path (an OpenAI-format state dict) or config= (random init)")
        overrides: dict[str, Any] = {}
        weights: list[tuple[dict[str, Tensor], str]] = []  # (state, source), loaded in this order
        checkpoint = read_openai_weights(checkpoint_path) if checkpoint_path is not None else None
        if model_name_or_path is not None:
            path, open_clip = _resolve(model_name_or_path)
            weights.append((read_openai_weights(path), str(path)))
            arch = _apply_open_clip_config(infer_config(weights[0][0], str(path)), open_clip)
            preprocess = open_clip.get("preprocess_cfg", {})
            overrides = {k: preprocess[k] for k in ("mean", "std", "interpolation") if k in preprocess}
        elif config is not None:
            arch = CLIPResNetConfig.from_dict(config)
        else:
            assert checkpoint is not None and checkpoint_path is not None
            arch = infer_config(checkpoint, checkpoint_path)
        if checkpoint is not None and checkpoint_path is not None:
            weights.append((checkpoint, checkpoint_path))
        tok = load_tokenizer(tokenizer)
        self.arch = arch
        self.model = _CLIPResNet(arch, tok).eval()
        self.model_name_or_path = model_name_or_path
        self.checkpoint_path = checkpoint_path
        self.name = model_name_or_path or "clip_resnet"
        self.embed_dim = self.num_features = arch.embed_dim
        self.num_prefix_tokens = 0
        self._data_config_overrides = {**overrides, **(data_config or {})}
        self.data_config()  # a data_config that cannot fit the image tower fails here, not in the datamodule's setup
        self._init_text_tower(tok, arch.embed_dim)
        for state, source in weights:
            self._load(state, source)

    def _load(self, state: dict[str, Tensor], source: str) -> None:
        """Strictly load an OpenAI-layout state dict (converted first) or one in this backbone's own layout."""
        if "token_embedding.weight" in state or any(k.startswith("visual.layer") for k in state):
            state = self._convert_openai(state, source)
        # files written without BatchNorm counters (they do not change eval outputs): keep this model's
        own = self.model.state_dict()
        state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
        load_into(self.model, state, source)

    def _convert_openai(self, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
        from timm.models.byobnet import checkpoint_filter_fn

        check_openai_resnet(state, source)
        state = {k: v for k, v in state.items() if k not in _OPENAI_METADATA}
        text, used, missing = openai_text_state(state, self.arch.transformer_layers)
        unexpected = sorted(k for k in state if not k.startswith("visual.") and k not in used)
        if missing or unexpected:
            raise ValueError(
                f"{source!r} does not match the CLIP text tower ({self.arch.transformer_layers} layers): "
                + "; ".join(f"{what} keys: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
                + ". Pass a complete OpenAI/open_clip CLIP ResNet state dict"
            )
        visual = checkpoint_filter_fn({k: v for k, v in state.items() if k.startswith("visual.")}, self.model.visual)
        # keys timm's converter does not know keep their "visual." name, so the error names them as in the file
        return {**{k if k.startswith("visual.") else f"visual.{k}": v for k, v in visual.items()}, **text}

    # ---- image tower: the CNN contract --------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        return self.model.visual.stem(x)  # (B, w, H/4, W/4)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.visual.stages  # four stages, (B, 32w, H/32, W/32) after the last

    def finalize(self, tokens: Tensor) -> Tensor:
        return self.model.visual.final_conv(tokens)  # identity for CLIP's ResNets

    def pool(self, tokens: Tensor) -> Tensor:
        return self.model.visual.head(tokens)  # (B, embed_dim): attention pool + CLIP's projection

    def encode_image(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, projection_dim) CLIP image features (not normalised) = ``forward``."""
        return self(x)

    # ---- metadata -----------------------------------------------------------------------------------------
    def unused_by_forward(self) -> tuple[str, ...]:
        return ("model.text_model.", "model.text_projection.", "model.logit_scale")  # the text side

    @property
    def lora_target_modules(self) -> list[str]:
        # the attention pool's projections: the only Linear layers of the image tower
        return ["visual.head.q", "visual.head.k", "visual.head.v", "visual.head.proj"]

    def data_config(self) -> dict[str, Any]:
        return clip_data_config(self.arch.image_resolution, self._data_config_overrides)

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def identity(self) -> str:
        source = self.checkpoint_path or ("pretrained" if self.model_name_or_path else "random init")
        return f"clip_resnet:{self.name} ({source})"

    @property
    def random_init(self) -> bool:
        return not (self.checkpoint_path or self.model_name_or_path)
