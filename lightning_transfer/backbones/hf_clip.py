"""Hugging Face CLIP (``transformers.CLIPModel``): the image tower as a token Backbone, plus a text tower that takes
token embeddings, so prompt learners (CoOp, CoCoOp) can splice learned vectors into the prompt.

Image tower, mapped onto ``embed -> run_block* -> finalize -> pool``:

* ``embed``: ``vision_model.embeddings`` (patches, CLS, positions) then ``vision_model.pre_layrnorm``.
* ``blocks``: ``vision_model.encoder.layers``; :meth:`HFCLIPBackbone.run_block_with_queries` runs VQT's query tokens
  through a layer's own submodules (pre-LN: ``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``).
* ``finalize``: ``vision_model.post_layernorm`` applied to every token. Hugging Face applies it to the pooled CLS
  token only; LayerNorm acts on each token on its own, so the CLS row is the same either way (the other tokens
  are simply normed as well, which HF's ``last_hidden_state`` is not).
* ``pool``: the CLS token of the finalized tokens = HF's ``vision_model(...).pooler_output`` (before the
  projection, width ``vision_config.hidden_size``). :meth:`HFCLIPBackbone.encode_image` adds
  ``visual_projection`` and equals ``CLIPModel.get_image_features``.

Text tower (:class:`CLIPTextTower`, shared with the CLIP ResNets of ``clip_resnet.py``):
:meth:`CLIPTextTower.encode_text_embeddings` takes (N, L, D) token embeddings, adds positions, runs the causal
transformer, ``final_layer_norm``, pools at the end-of-text position and projects; on plain token ids it equals
``CLIPModel.get_text_features``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import (
    Backbone,
    attend_to_tokens,
    capture_outputs,
    load_into,
    merge_heads,
    per_channel_stats,
    query_key_mask,
    read_state_dict,
    split_heads,
)
from lightning_transfer.registry import register_backbone

# OpenAI CLIP preprocessing statistics (the same for every released CLIP)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eot_positions(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """(N, L) token ids -> (N,) index of the end-of-text token, exactly as ``CLIPTextTransformer`` picks it.

    Configs saved before transformers PR #24773 carry ``eos_token_id == 2``; for those HF takes the largest id
    (OpenAI's EOT is the last vocabulary entry), otherwise the first occurrence of ``eos_token_id``.
    """
    if eos_token_id == 2:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids.to(torch.int) == eos_token_id).to(torch.int).argmax(dim=-1)


def load_tokenizer(name_or_path: str) -> Any:
    """CLIP's BPE tokenizer from a hub name (needs internet once) or a local directory (``save_pretrained``)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path)


def clip_data_config(image_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """CLIP's preprocessing (OpenAI mean/std, bicubic resize, center crop of the whole short side) + ``overrides``."""
    cfg: dict[str, Any] = {"input_size": (3, image_size, image_size), "mean": CLIP_MEAN, "std": CLIP_STD,
                           "interpolation": "bicubic", "crop_pct": 1.0}
    cfg.update(overrides)
    return per_channel_stats(cfg, overrides, "CLIP's image tower", model_channels=3)  # RGB only


class CLIPTextTower:
    """The text-tower API of a CLIP backbone, shared by every CLIP image tower (ViT: HFCLIPBackbone, ResNet:
    CLIPResNetBackbone), so prompt learners and zero-shot CLIP run on any of them unchanged.

    The host class sets ``self.model`` with ``text_model`` (transformers' CLIP text transformer), ``text_projection``
    (Linear, no bias) and ``logit_scale`` (a scalar Parameter, as ``CLIPModel`` names them), then calls
    :meth:`_init_text_tower`.
    """

    #: the model has a text tower (read by strategies that build classifiers from class names)
    has_text_tower: ClassVar[bool] = True
    model: Any
    tokenizer: Any
    text_width: int
    projection_dim: int
    context_length: int

    def _init_text_tower(self, tokenizer: Any, projection_dim: int) -> None:
        """Keep the tokenizer (see :func:`load_tokenizer`) and read the text tower's sizes; checks the vocabulary."""
        self.tokenizer = tokenizer
        text = self.model.text_model.config
        self.text_width = int(text.hidden_size)
        self.projection_dim = int(projection_dim)
        self.context_length = int(text.max_position_embeddings)
        if len(self.tokenizer) > text.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the text tower's vocab_size is "
                             f"{text.vocab_size}: pass the tokenizer the model was trained with")

    # ---- the text tower -------------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int:
        return int(self.model.text_model.config.eos_token_id)

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned temperature, ``exp(logit_scale)`` (100 for OpenAI's models)."""
        return self.model.logit_scale.exp()

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Texts -> (N, context_length) ids with start/end-of-text tokens and padding; over-long texts fail."""
        rows = self.tokenizer(list(texts))["input_ids"]  # with start/end-of-text tokens, unpadded
        too_long = [i for i, r in enumerate(rows) if len(r) > self.context_length]
        if too_long:
            i = too_long[0]
            raise ValueError(f"prompt {texts[i]!r} is {len(rows[i])} tokens, longer than the text tower's context of "
                             f"{self.context_length}: shorten the class name or template, or use fewer n_ctx")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id
        ids = torch.full((len(rows), self.context_length), int(pad), dtype=torch.long)  # (N, L)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids

    def token_ids(self, text: str) -> list[int]:
        """The ids of ``text`` without start/end-of-text tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_embedding(self, input_ids: Tensor) -> Tensor:
        """(N, L) ids -> (N, L, text_width) token embeddings (no positions)."""
        return self.model.text_model.embeddings.token_embedding(input_ids)

    def encode_text_embeddings(self, embeddings: Tensor, eot_index: Tensor) -> Tensor:
        """(N, L, text_width) token embeddings + (N,) end-of-text positions -> (N, projection_dim) text features.

        Positions are added here; the transformer is causal, so tokens after the end-of-text token never reach
        the pooled output (padding needs no mask).
        """
        tm = self.model.text_model
        n, length, _ = embeddings.shape
        x = embeddings + tm.embeddings.position_embedding(tm.embeddings.position_ids[:, :length])  # (N, L, D)
        mask = _causal_mask(tm.config, x)
        x = tm.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
        x = tm.final_layer_norm(x)
        pooled = x[torch.arange(n, device=x.device), eot_index.to(x.device)]  # (N, D)
        return self.model.text_projection(pooled)  # (N, projection_dim)

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """(N, L) ids -> (N, projection_dim) = ``CLIPModel.get_text_features`` (not normalised)."""
        return self.encode_text_embeddings(self.token_embedding(input_ids), eot_positions(input_ids, self.eos_token_id))


@register_backbone("hf_clip")
class HFCLIPBackbone(CLIPTextTower, Backbone):
    """A ``transformers.CLIPModel``: the image tower behind the token contract and a text tower for prompts.

    Args:
        model_name_or_path: a hub name (``openai/clip-vit-base-patch16``; needs internet the first time) or a
            local directory written by ``CLIPModel.save_pretrained`` (works offline). ``None`` builds a randomly
            initialised model from ``config``.
        tokenizer: hub name or local directory of the tokenizer; default ``model_name_or_path``. Required when
            ``model_name_or_path`` is ``None``.
        config: ``CLIPConfig`` keyword arguments (``text_config``, ``vision_config``, ``projection_dim``) for a
            randomly initialised model (tests, cost benchmarks); ignored when ``model_name_or_path`` is given.
        checkpoint_path: a local ``CLIPModel`` state dict (``.safetensors`` or a torch file read with
            ``weights_only=True``) loaded strictly on top of the model.
        data_config: overrides for the preprocessing config (``input_size``, ``mean``, ``std``, ...).
    """

    supports_queries: ClassVar[bool] = True
    final_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_model.post_layernorm.", "model.visual_projection.")
    image_tower_prefix: ClassVar[str] = "model.vision_model"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        tokenizer: str | None = None,
        config: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        if model_name_or_path is None and config is None:
            raise ValueError("HFCLIPBackbone needs model_name_or_path (hub name or local directory) or config=")
        if model_name_or_path is None and tokenizer is None:
            raise ValueError("a CLIP built from config= needs tokenizer= (a hub name or a local tokenizer directory)")
        if model_name_or_path is not None:
            local = Path(model_name_or_path).expanduser()
            if local.exists() and not (local / "config.json").is_file():
                raise FileNotFoundError(f"{str(local)!r} has no config.json: save the model there with "
                                        "CLIPModel.save_pretrained(path) or pass a hub name")
            source = str(local) if local.exists() else model_name_or_path
            self.model = CLIPModel.from_pretrained(source)
        else:
            self.model = CLIPModel(CLIPConfig(**(config or {})))
        self.model.eval()
        tok_source = tokenizer or model_name_or_path
        assert tok_source is not None
        self.model_name_or_path = model_name_or_path
        self.checkpoint_path = checkpoint_path
        self.name = model_name_or_path or "clip"
        model_config: Any = self.model.config  # transformers types its sub-configs loosely
        self.embed_dim = model_config.vision_config.hidden_size
        self.num_features = model_config.vision_config.hidden_size
        self.num_prefix_tokens = 1
        self._data_config_overrides = dict(data_config or {})
        self.data_config()  # a data_config that cannot fit the image tower fails here, not in the datamodule's setup
        self._init_text_tower(load_tokenizer(tok_source), model_config.projection_dim)
        if checkpoint_path is not None:
            load_into(self.model, read_state_dict(checkpoint_path), checkpoint_path)

    # ---- image tower: the token contract ------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        vm = self.model.vision_model
        return vm.pre_layrnorm(vm.embeddings(x))  # (B, 1 + N, D)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.vision_model.encoder.layers

    def run_block(self, index: int, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        # CLIPEncoderLayer takes an additive (B, 1, N, N) mask or None
        return self.blocks[index](tokens, attn_mask)

    def run_block_with_queries(self, index: int, tokens: Tensor, queries: Tensor,
                               attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A ``CLIPEncoderLayer`` with query tokens, built from the layer's own submodules (see the base class).

        The token path is the plain layer call under ``no_grad`` (bit-identical to :meth:`run_block`); hooks keep
        the keys and values that call computes, and the query rows read them. ``attn_mask`` is an optional additive
        key mask (B, 1, 1, N). Attention dropout is not applied to the query rows (the frozen tower runs in eval).
        """
        layer: Any = self.blocks[index]
        attn = layer.self_attn
        key_mask = query_key_mask(attn_mask, tokens)
        with torch.no_grad(), capture_outputs(attn.k_proj, attn.v_proj) as (keys, values):
            tokens_out = self.run_block(index, tokens, key_mask)  # (B, N, D), exactly the plain layer
        kv = split_heads(keys[0], attn.num_heads), split_heads(values[0], attn.num_heads)  # 2 x (B, H, N, d)
        q = split_heads(attn.q_proj(layer.layer_norm1(queries)), attn.num_heads)  # (B, H, T, d)
        out = attend_to_tokens(q, tokens, lambda t: self._keys_values(layer, t), attn.scale, key_mask, kv)
        queries = queries + attn.out_proj(merge_heads(out))  # (B, T, D)
        queries = queries + layer.mlp(layer.layer_norm2(queries))
        return tokens_out, queries

    @staticmethod
    def _keys_values(layer: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of a layer's original rows: (B, N, D) -> 2 x (B, H, N, d)."""
        attn, h = layer.self_attn, layer.layer_norm1(tokens)
        return split_heads(attn.k_proj(h), attn.num_heads), split_heads(attn.v_proj(h), attn.num_heads)

    def finalize(self, tokens: Tensor) -> Tensor:
        return self.model.vision_model.post_layernorm(tokens)  # per-token LN: the CLS row equals HF's pooled output

    def pool(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]  # (B, D) = vision_model(...).pooler_output

    def encode_image(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, projection_dim) = ``CLIPModel.get_image_features`` (not normalised)."""
        return self.model.visual_projection(self(x))

    # ---- metadata -----------------------------------------------------------------------------------------
    def unused_by_forward(self) -> tuple[str, ...]:
        # forward pools the CLS token before the projection; only encode_image and the text side use the rest
        return ("model.text_model.", "model.text_projection.", "model.logit_scale", "model.visual_projection.")

    @property
    def lora_target_modules(self) -> list[str]:
        # full names, so LoRA lands in the image tower only (the text tower has the same module names)
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2"]
        return [f"vision_model.encoder.layers.{i}.{n}" for i in range(self.depth) for n in names]

    def data_config(self) -> dict[str, Any]:
        config: Any = self.model.config
        return clip_data_config(config.vision_config.image_size, self._data_config_overrides)

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def identity(self) -> str:
        source = self.checkpoint_path or ("pretrained" if self.model_name_or_path else "random init")
        return f"hf_clip:{self.name} ({source})"

    @property
    def random_init(self) -> bool:
        return not (self.checkpoint_path or self.model_name_or_path)


@functools.cache
def _causal_mask_parameters() -> frozenset[str]:
    """Parameter names of the installed ``create_causal_mask`` (read once, not on every text-tower call)."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return frozenset(inspect.signature(create_causal_mask).parameters)


def _causal_mask(config, inputs_embeds: Tensor):
    """The causal mask ``transformers`` builds for the text tower, across its releases.

    ``create_causal_mask`` took ``input_embeds``/``cache_position``/``past_key_values`` in earlier 5.x releases and
    ``inputs_embeds``/``cache`` later; this passes whichever names the installed version has.
    """
    from transformers.masking_utils import create_causal_mask

    params = _causal_mask_parameters()
    kwargs = {"config": config, "attention_mask": None}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    return create_causal_mask(**kwargs)
