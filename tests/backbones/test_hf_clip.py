"""HFCLIPBackbone against transformers' own CLIPModel: image tower contract, embeddings-in text tower, loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_transfer.backbones.hf_clip import HFCLIPBackbone, eot_positions
from tests.helpers.tiny_clip import tiny_clip, tiny_clip_config, tiny_clip_dir


@pytest.fixture(scope="module")
def clip() -> HFCLIPBackbone:
    return tiny_clip().eval()


def _images(backbone: HFCLIPBackbone, batch: int = 3) -> torch.Tensor:
    c, h, w = backbone.data_config()["input_size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(2))


def test_token_contract_equals_hf_image_tower(clip):
    x = _images(clip)
    with torch.no_grad():
        out = clip.forward_tokens(x, return_hidden_states=True)
        hf = clip.model.vision_model(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(out.pooled, hf.pooler_output, atol=1e-6, rtol=0)
        torch.testing.assert_close(clip.encode_image(x), clip.model.get_image_features(x).pooler_output,
                                   atol=1e-6, rtol=0)
    assert len(out.hidden_states) == clip.depth + 1
    torch.testing.assert_close(out.hidden_states[-1], hf.last_hidden_state, atol=1e-6, rtol=0)
    assert out.pooled.shape == (3, clip.num_features)
    assert clip.num_prefix_tokens == 1 and out.tokens.shape[1] == 1 + (16 // 4) ** 2


def test_text_tower_equals_get_text_features(clip):
    texts = ["a photo of a 5.", "itap of a dog.", "x x x x cat.", "a"]
    ids = clip.tokenize(texts)
    assert ids.shape == (4, clip.context_length)
    with torch.no_grad():
        ref = clip.model.get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(clip.encode_text(ids), ref, atol=1e-5, rtol=0)
        # the embeddings-in path with the plain token embeddings is the same computation
        emb = clip.token_embedding(ids)
        torch.testing.assert_close(clip.encode_text_embeddings(emb, eot_positions(ids, clip.eos_token_id)), ref,
                                   atol=1e-5, rtol=0)
    # padding after the end-of-text token never reaches the pooled feature (causal attention)
    noisy = emb.clone()
    eot = eot_positions(ids, clip.eos_token_id)
    noisy[3, eot[3] + 1:] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text_embeddings(noisy, eot), ref, atol=1e-5, rtol=0)


def test_spliced_embeddings_change_the_feature_and_carry_gradients(clip):
    ids = clip.tokenize(["x x a dog."])
    emb = clip.token_embedding(ids).detach()
    ctx = torch.zeros(2, clip.text_width, requires_grad=True)
    spliced = torch.cat([emb[:, :1], ctx.unsqueeze(0), emb[:, 3:]], dim=1)
    feat = clip.encode_text_embeddings(spliced, eot_positions(ids, clip.eos_token_id))
    feat.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_eot_positions_follow_hf_conventions():
    ids = torch.tensor([[5, 7, 9, 9, 9], [5, 9, 1, 1, 1]])
    assert eot_positions(ids, eos_token_id=9).tolist() == [2, 1]  # first occurrence of the EOS id
    assert eot_positions(ids, eos_token_id=2).tolist() == [2, 1]  # legacy configs: the largest id


def test_lora_targets_are_image_tower_linears(clip):
    modules = dict(clip.named_modules())
    targets = clip.lora_target_modules
    assert len(targets) == 6 * clip.depth
    for t in targets:
        hits = [m for name, m in modules.items() if name == t or name.endswith("." + t)]
        assert len(hits) == 1 and isinstance(hits[0], nn.Linear), t
    assert not any("text_model" in t for t in targets)


def test_layer_ids_and_data_config(clip):
    ids = clip.layer_ids()
    assert ids["model.vision_model.embeddings.patch_embedding.weight"] == 0
    assert ids["model.vision_model.encoder.layers.1.mlp.fc1.weight"] == 2
    assert ids["model.vision_model.post_layernorm.weight"] == clip.depth + 1
    cfg = clip.data_config()
    assert cfg["input_size"] == (3, 16, 16) and len(cfg["mean"]) == 3 and cfg["interpolation"] == "bicubic"


def test_local_directory_loads_offline_with_the_saved_weights():
    from transformers import CLIPModel

    path = tiny_clip_dir()
    backbone = HFCLIPBackbone(model_name_or_path=path)
    reference = CLIPModel.from_pretrained(path)
    for (name, a), (_, b) in zip(backbone.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert "random init" not in backbone.identity()


def test_random_init_from_config_and_checkpoint_path(tmp_path):
    from safetensors.torch import save_file

    tok_dir = tiny_clip_dir()
    reference = tiny_clip()
    config = tiny_clip_config(reference.model.config.text_config.vocab_size, reference.eos_token_id,
                              reference.model.config.text_config.bos_token_id)
    torch.manual_seed(123)  # not the seed the saved tiny model was drawn with
    random = HFCLIPBackbone(config=config, tokenizer=tok_dir)
    assert "random init" in random.identity()
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in reference.export_state_dict().items()}, str(path))
    loaded = HFCLIPBackbone(config=config, tokenizer=tok_dir, checkpoint_path=str(path))
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(random.model.text_projection.weight, reference.model.text_projection.weight)


def test_clear_errors(tmp_path, clip):
    with pytest.raises(ValueError, match="model_name_or_path"):
        HFCLIPBackbone()
    with pytest.raises(ValueError, match="tokenizer="):
        HFCLIPBackbone(config={})
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HFCLIPBackbone(model_name_or_path=str(tmp_path))
    with pytest.raises(ValueError, match="longer than the text tower's context"):
        clip.tokenize(["a " * 40])
