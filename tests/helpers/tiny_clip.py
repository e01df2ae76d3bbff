"""A tiny random CLIP and a tiny BPE tokenizer, built offline and saved once per machine with ``save_pretrained``.

The tokenizer is a real ``CLIPTokenizer`` (byte-level BPE, CLIP's normaliser and pre-tokeniser) over a small
vocabulary: every byte symbol alone and word-final, plus merges for a few prompt words, so ``"a photo of a"`` is
four tokens as with OpenAI's vocabulary. The start/end-of-text tokens are the last two ids (as in OpenAI's).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from lightning_transfer.backbones.hf_clip import HFCLIPBackbone

_DIR = Path(tempfile.gettempdir()) / "lightning-transfer-test-weights"
WORDS = ["photo", "of", "the", "type", "pet", "digit", "number", "itap", "picture", "handwritten", "cat", "dog",
         "bird", "center", "satellite", "texture", "flower", "food", "person", "doing", "aircraft", "car"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE vocabularies use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_tokenizer(directory: Path) -> None:
    """vocab.json + merges.txt of a small CLIP BPE vocabulary, saved as a ``CLIPTokenizer`` in ``directory``."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for s in symbols[1:]:
            rule = f"{merged} {s}"
            merged = merged + s
            if rule not in merges:
                merges.append(rule)
                vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt")).save_pretrained(directory)


def tiny_clip_config(vocab_size: int, eos_token_id: int, bos_token_id: int, **vision: int) -> dict:
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 32, "eos_token_id": eos_token_id,
            "bos_token_id": bos_token_id, "pad_token_id": eos_token_id}
    vis = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "image_size": 16, "patch_size": 4, **vision}
    return {"text_config": text, "vision_config": vis, "projection_dim": 24}


def tiny_clip_dir(tag: str = "tiny_clip_ctx32") -> str:
    """A local directory holding a tiny random ``CLIPModel`` (seed 0) and its tokenizer, written once."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    path = _DIR / tag
    if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        return str(path)
    tmp = _DIR / f"{tag}.tmp{torch.randint(0, 1 << 30, ()).item()}"
    write_tiny_tokenizer(tmp)
    tok = AutoTokenizer.from_pretrained(str(tmp))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**tiny_clip_config(len(tok), tok.eos_token_id, tok.bos_token_id)))
    model.save_pretrained(tmp)
    try:
        tmp.replace(path)
    except OSError:  # another process wrote it first
        pass
    return str(path)


def tiny_clip(**kwargs) -> HFCLIPBackbone:
    return HFCLIPBackbone(model_name_or_path=tiny_clip_dir(), **kwargs)


def tiny_clip_resnet(**kwargs):
    """A tiny random OpenAI-style CLIP ResNet (``CLIPResNetBackbone``, RN50's layout) with the tiny tokenizer.

    Its weights are drawn once under a fixed seed and saved, and every call loads them through ``checkpoint_path``
    (a checkpoint can rebuild a frozen backbone only from weights on disk, never from a random init).
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from lightning_transfer.backbones.clip_resnet import CLIPResNetBackbone

    directory = tiny_clip_dir()
    path = _DIR / "tiny_clip_resnet.safetensors"
    config = {"embed_dim": 24, "image_resolution": 32, "vision_layers": [1, 1, 1, 1], "vision_width": 8,
              "context_length": 32, "vocab_size": len(AutoTokenizer.from_pretrained(directory)),
              "transformer_width": 32, "transformer_heads": 2, "transformer_layers": 2}
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPResNetBackbone(config=config, tokenizer=directory)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.export_state_dict().items()}, str(tmp))
        tmp.replace(path)
    # this backbone's own layout: the sizes come from config, the weights from the file
    return CLIPResNetBackbone(config=config, checkpoint_path=str(path), tokenizer=directory, **kwargs)
