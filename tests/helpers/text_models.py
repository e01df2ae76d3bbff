"""Tiny weight-free BERT encoders for tests.

The tiny BERT is initialised once with a fixed seed and written with ``save_pretrained`` to a local directory, which
:class:`HFTextBackbone` loads through ``model_name_or_path`` (the path a user's local copy takes), so a checkpoint
reloads onto the same frozen "pretrained" weights. :class:`PixelTokensBert` reads the 8x8 Digits images as 64 pixel
tokens, so the strategy contract suite (which trains on Digits) runs on a real BERT layer stack.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_transfer.backbones.hf_text import HFTextBackbone

TINY_BERT = {"model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3,
             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 72,
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
_WEIGHTS_DIR = Path(tempfile.gettempdir()) / "lightning-transfer-test-weights"


def tiny_bert_dir(config: dict[str, Any] | None = None) -> str:
    """A deterministic "pretrained" tiny BERT (seed 0) saved with ``save_pretrained``, written once per machine."""
    config = dict(config or TINY_BERT)
    tag = hashlib.sha1(repr(sorted(config.items())).encode()).hexdigest()[:10]
    path = _WEIGHTS_DIR / f"tiny_bert_{tag}"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        backbone = HFTextBackbone(config=config)
        _WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=_WEIGHTS_DIR))
        backbone.model.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


# a few words, so that short sentences tokenise to whole words (ids 5..); [PAD] 0, [CLS] 1, [SEP] 2 as BERT's order
TINY_WORDS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", "good", "bad", "movie", "film", "great", "awful", "the",
              "a", "is", "was", "not", "very", "plot", "acting", "fun", "!", ".", ","]


def tiny_bert_text_dir() -> str:
    """The tiny BERT of :func:`tiny_bert_dir` with a WordPiece tokenizer of :data:`TINY_WORDS` saved beside it."""
    from transformers import BertTokenizer

    path = _WEIGHTS_DIR / f"{Path(tiny_bert_dir()).name}_with_tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=_WEIGHTS_DIR))
        shutil.copytree(tiny_bert_dir(), tmp, dirs_exist_ok=True)
        BertTokenizer(vocab={word: i for i, word in enumerate(TINY_WORDS)}).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def tiny_bert(**overrides: Any) -> HFTextBackbone:
    return HFTextBackbone(model_name_or_path=tiny_bert_dir(), **overrides)


def token_inputs(backbone: HFTextBackbone, batch: int = 4, length: int = 12) -> Tensor:
    """(B, L) token ids with a [CLS]-like first token and right padding of different lengths."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, backbone.model.config.vocab_size, (batch, length), generator=g)
    for i in range(batch):
        ids[i, length - i * 2:] = backbone.pad_token_id
    ids[:, 0] = 1
    return ids


class PixelTokensBert(HFTextBackbone):
    """The tiny BERT reading an image (B, 1, 8, 8) as 64 pixel tokens after a [CLS] token (test helper).

    Each normalised pixel value is binned into one of the vocabulary's ids; everything after ``embed`` is the
    plain BERT encoder.
    """

    def embed(self, x: Any) -> Tensor:  # type: ignore[override]
        if isinstance(x, Tensor) and x.dtype.is_floating_point:  # (B, 1, 8, 8) normalised pixels
            vocab = self.model.config.vocab_size
            bins = ((x.flatten(1) + 1.0) * 8).round().clamp(0, vocab - 3).long() + 2  # (B, 64), ids 2..vocab-1
            x = torch.cat([torch.ones_like(bins[:, :1]), bins], dim=1)  # (B, 65): [CLS] + pixels
        return super().embed(x)

    def data_config(self) -> dict[str, Any]:
        return {"input_size": (1, 8, 8), "mean": (0.3,), "std": (0.35,), "interpolation": "bilinear",
                "crop_pct": 1.0}


def pixel_bert() -> PixelTokensBert:
    return PixelTokensBert(model_name_or_path=tiny_bert_dir())
