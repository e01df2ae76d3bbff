"""CLIPResNetBackbone on a tiny random CLIP ResNet written in OpenAI's key layout: weights, features, strategies.

The reference side is independent of the library: the text tensors are drawn directly in OpenAI's layout and read by
a slow text transformer written here; the image tensors come from a timm ByobNet renamed to OpenAI's keys by an
inverse mapping written here, and the image reference is timm's own model loaded with timm's own converter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_transfer.backbones.clip_resnet import WEIGHTS_FILE, CLIPResNetBackbone, CLIPResNetConfig
from lightning_transfer.backbones.hf_clip import eot_positions
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.bitfit import BitFit
from lightning_transfer.strategies.coop import CoOp
from lightning_transfer.strategies.linear_probe import LinearProbe
from lightning_transfer.strategies.lora import LoRA
from lightning_transfer.strategies.zeroshot_clip import ZeroShotCLIP
from tests.helpers.tiny_clip import tiny_clip_dir

WIDTH, LAYERS, CONTEXT, EMBED, RESOLUTION = 128, 2, 32, 24, 64  # text heads: 128 // 64 = 2, as OpenAI infers
STAGES, CHANNELS = (1, 2, 1, 1), (32, 64, 128, 256)  # vision width 8: stem 4, 4, 8; 256 // 64 = 4 pool heads
NAMES = ["cat", "dog", "bird"]


# ---- a tiny OpenAI-format CLIP ResNet -----------------------------------------------------------------------
def _timm_visual() -> nn.Module:
    from timm.models.byobnet import ByoBlockCfg, ByobNet, model_cfgs

    blocks = tuple(ByoBlockCfg(type="bottle", d=d, c=c, s=1 if i == 0 else 2, br=0.25)
                   for i, (d, c) in enumerate(zip(STAGES, CHANNELS)))
    cfg = replace(model_cfgs["resnet50_clip"], blocks=blocks, stem_chs=(4, 4, 8))
    return ByobNet(cfg, num_classes=EMBED, img_size=RESOLUTION).eval()


_STAGE_PARTS = {"shortcut.conv.conv.": "downsample.0.", "shortcut.conv.bn.": "downsample.1.",
                "conv1_1x1.conv.": "conv1.", "conv1_1x1.bn.": "bn1.", "conv2_kxk.conv.": "conv2.",
                "conv2_kxk.bn.": "bn2.", "conv3_1x1.conv.": "conv3.", "conv3_1x1.bn.": "bn3."}
_HEAD_PARTS = {"pos_embed": "positional_embedding", "q.": "q_proj.", "k.": "k_proj.", "v.": "v_proj.",
               "proj.": "c_proj."}


def _openai_visual_key(key: str) -> str:
    """timm ByobNet key -> OpenAI ModifiedResNet key (the inverse of what the backbone must do)."""
    if m := re.fullmatch(r"stem\.conv(\d)\.(conv|bn)\.(.+)", key):
        return f"visual.{m[2]}{m[1]}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(.+)", key):
        part = next(p for p in _STAGE_PARTS if m[3].startswith(p))
        return f"visual.layer{int(m[1]) + 1}.{m[2]}.{_STAGE_PARTS[part]}{m[3][len(part):]}"
    rest = key.removeprefix("head.")
    part = next(p for p in _HEAD_PARTS if rest.startswith(p))
    return f"visual.attnpool.{_HEAD_PARTS[part]}{rest[len(part):]}"


def _openai_text(vocab: int, g: torch.Generator) -> dict[str, Tensor]:
    def r(*shape: int, std: float = 0.02) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    state = {"token_embedding.weight": r(vocab, WIDTH), "positional_embedding": r(CONTEXT, WIDTH, std=0.01),
             "ln_final.weight": 1 + r(WIDTH, std=0.1), "ln_final.bias": r(WIDTH, std=0.1),
             "text_projection": r(WIDTH, EMBED, std=WIDTH ** -0.5), "logit_scale": torch.tensor(math.log(100.0))}
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        state |= {p + "ln_1.weight": 1 + r(WIDTH, std=0.1), p + "ln_1.bias": r(WIDTH, std=0.1),
                  p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH, std=WIDTH ** -0.5),
                  p + "attn.in_proj_bias": r(3 * WIDTH),
                  p + "attn.out_proj.weight": r(WIDTH, WIDTH, std=WIDTH ** -0.5), p + "attn.out_proj.bias": r(WIDTH),
                  p + "ln_2.weight": 1 + r(WIDTH, std=0.1), p + "ln_2.bias": r(WIDTH, std=0.1),
                  p + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH, std=WIDTH ** -0.5), p + "mlp.c_fc.bias": r(4 * WIDTH),
                  p + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH, std=(4 * WIDTH) ** -0.5),
                  p + "mlp.c_proj.bias": r(WIDTH)}
    return state


def _vocab_size() -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tiny_clip_dir()))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """The OpenAI-format state dict, its file, and the timm model its image tensors came from."""
    g = torch.Generator().manual_seed(7)
    visual = _timm_visual()
    with torch.no_grad():  # non-trivial BatchNorm (timm zero-inits the last BN of each block)
        for m in visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    state = {_openai_visual_key(k): v.clone() for k, v in visual.state_dict().items()}
    state |= _openai_text(_vocab_size(), g)
    path = tmp_path_factory.mktemp("clip_rn") / "rn_tiny.safetensors"
    save_file(state, str(path))
    return {"state": state, "path": str(path), "visual": visual}


def _backbone(weights: dict, **kwargs) -> CLIPResNetBackbone:
    return CLIPResNetBackbone(checkpoint_path=weights["path"], tokenizer=tiny_clip_dir(), **kwargs)


@pytest.fixture(scope="module")
def clip(weights) -> CLIPResNetBackbone:
    return _backbone(weights)


def _images(batch: int = 3) -> Tensor:
    return torch.randn(batch, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(2))


# ---- slow references straight from the OpenAI tensors --------------------------------------------------------
def _reference_text(state: dict[str, Tensor], ids: Tensor) -> Tensor:
    """OpenAI's text encoder: causal pre-LN transformer, QuickGELU MLP, ln_final, EOT = argmax id, @ projection."""
    n, length = ids.shape
    heads, d = WIDTH // 64, 64
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][:length]  # (N, L, W)
    causal = torch.full((length, length), float("-inf")).triu(1)

    def ln(t: Tensor, name: str) -> Tensor:
        return F.layer_norm(t, (WIDTH,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        qkv = ln(x, p + "ln_1") @ state[p + "attn.in_proj_weight"].T + state[p + "attn.in_proj_bias"]
        q, k, v = (t.reshape(n, length, heads, d).transpose(1, 2) for t in qkv.split(WIDTH, dim=-1))
        attn = (q @ k.transpose(-1, -2) / math.sqrt(d) + causal).softmax(-1)  # (N, H, L, L)
        out = (attn @ v).transpose(1, 2).reshape(n, length, WIDTH)
        x = x + out @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
        h = ln(x, p + "ln_2") @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    x = ln(x, "ln_final")
    return x[torch.arange(n), ids.argmax(dim=-1)] @ state["text_projection"]  # (N, E)


def _reference_attnpool(state: dict[str, Tensor], fmap: Tensor) -> Tensor:
    """OpenAI's AttentionPool2d: mean token + positions, the mean token attends to all, then c_proj."""
    b, c, _, _ = fmap.shape
    heads, d = c // 64, 64
    p = "visual.attnpool."
    x = fmap.flatten(2).transpose(1, 2)  # (B, HW, C)
    x = torch.cat([x.mean(1, keepdim=True), x], dim=1) + state[p + "positional_embedding"]
    q = x[:, :1] @ state[p + "q_proj.weight"].T + state[p + "q_proj.bias"]
    k = x @ state[p + "k_proj.weight"].T + state[p + "k_proj.bias"]
    v = x @ state[p + "v_proj.weight"].T + state[p + "v_proj.bias"]
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v  # (B, H, 1, d)
    return out.transpose(1, 2).reshape(b, c) @ state[p + "c_proj.weight"].T + state[p + "c_proj.bias"]


# ---- weights and features -------------------------------------------------------------------------------------
def test_architecture_is_read_from_the_shapes(clip):
    assert clip.arch == CLIPResNetConfig(embed_dim=EMBED, image_resolution=RESOLUTION, vision_layers=STAGES,
                                         vision_width=8, context_length=CONTEXT, vocab_size=_vocab_size(),
                                         transformer_width=WIDTH, transformer_heads=2, transformer_layers=LAYERS)
    sizes = (clip.text_width, clip.projection_dim, clip.context_length, clip.num_features)
    assert sizes == (WIDTH, EMBED, CONTEXT, EMBED)
    assert clip.has_text_tower and not clip.has_tokens and clip.depth == 4
    assert clip.data_config()["input_size"] == (3, RESOLUTION, RESOLUTION)
    assert clip.data_config()["interpolation"] == "bicubic"
    assert clip.logit_scale.item() == pytest.approx(100.0)


def test_text_features_equal_the_openai_reference(clip, weights):
    ids = clip.tokenize(["a photo of a cat.", "itap of a dog.", "x x x x bird.", "a"])
    with torch.no_grad():
        ref = _reference_text(weights["state"], ids)
        torch.testing.assert_close(clip.encode_text(ids), ref, atol=1e-5, rtol=0)
        emb = clip.token_embedding(ids)
        out = clip.encode_text_embeddings(emb, eot_positions(ids, clip.eos_token_id))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_image_features_equal_timm_with_its_own_converter(clip, weights):
    from timm.models.byobnet import checkpoint_filter_fn

    reference = _timm_visual()
    reference.load_state_dict(checkpoint_filter_fn(weights["state"], reference))  # strict
    x = _images()
    with torch.no_grad():
        out = clip.forward_tokens(x, return_hidden_states=True)
        torch.testing.assert_close(clip.encode_image(x), reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled, weights["visual"](x), atol=1e-5, rtol=1e-5)
        # the pooled feature is CLIP's image feature: OpenAI's attention pool including c_proj
        pooled = _reference_attnpool(weights["state"], out.hidden_states[-1])
        torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == clip.depth + 1 and out.pooled.shape == (3, EMBED)


def test_lora_targets_and_layer_ids(clip):
    modules = dict(clip.named_modules())
    for target in clip.lora_target_modules:
        hits = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        assert len(hits) == 1 and isinstance(hits[0], nn.Linear), target
    ids = clip.layer_ids()
    assert ids["model.visual.stem.conv1.conv.weight"] == 0
    assert ids["model.visual.stages.1.0.conv1_1x1.conv.weight"] == 2
    assert ids["model.visual.head.proj.weight"] == clip.depth + 1


# ---- strategies --------------------------------------------------------------------------------------------
def _step(module: TransferModule) -> Tensor:
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.train()
    x = _images(4)
    loss = module.adaptation.loss(module(x), (x, torch.tensor([0, 1, 2, 0])))
    loss.backward()
    optimizer.step()
    return loss


def test_zero_shot_and_a_coop_step(weights):
    zero_shot = TransferModule(_backbone(weights), ZeroShotCLIP(), num_classes=3, class_names=NAMES).eval()
    with torch.no_grad():
        logits = zero_shot(_images())
    assert logits.shape == (3, 3) and zero_shot.parameter_counts()["trainable"] == 0

    coop = CoOp(n_ctx=4)
    module = TransferModule(_backbone(weights), coop, num_classes=3, class_names=NAMES)
    before = coop.ctx.detach().clone()
    bn = module.backbone.model.visual.stem.conv1.bn.running_mean.clone()
    assert torch.isfinite(_step(module))
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad == {"adaptation.ctx"}
    assert not torch.equal(coop.ctx, before)
    assert torch.equal(module.backbone.model.visual.stem.conv1.bn.running_mean, bn)  # CLIP stays in eval mode


@pytest.mark.parametrize("strategy", [LinearProbe, BitFit, lambda: LoRA(r=2)], ids=["linear_probe", "bitfit", "lora"])
def test_cnn_strategies_train(weights, strategy):
    module = TransferModule(_backbone(weights), strategy(), num_classes=3)
    assert torch.isfinite(_step(module))
    assert module.parameter_counts()["trainable"] > 0


# ---- loading paths -----------------------------------------------------------------------------------------
def test_local_directory_hub_and_own_layout(weights, tmp_path, monkeypatch, clip):
    folder = tmp_path / "rn_tiny"
    folder.mkdir()
    save_file(weights["state"], str(folder / WEIGHTS_FILE))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"quick_gelu": True, "text_cfg": {"heads": 2}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    local = CLIPResNetBackbone(model_name_or_path=str(folder), tokenizer=tiny_clip_dir())
    assert local.data_config()["mean"] == (0.5, 0.5, 0.5)

    import huggingface_hub

    def fake_download(repo_id: str, filename: str, **_: object) -> str:
        assert repo_id == "timm/resnet50_clip.openai"
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = CLIPResNetBackbone(model_name_or_path="timm/resnet50_clip.openai", tokenizer=tiny_clip_dir())
    own = tmp_path / "exported.safetensors"  # this backbone's layout, e.g. a merged LoRA export
    save_file({k: v.contiguous() for k, v in clip.export_state_dict().items()}, str(own))
    config = {k: getattr(clip.arch, k) for k in ("embed_dim", "image_resolution", "vision_layers", "vision_width",
                                                 "context_length", "vocab_size", "transformer_width",
                                                 "transformer_heads", "transformer_layers")}
    reloaded = CLIPResNetBackbone(config=config, checkpoint_path=str(own), tokenizer=tiny_clip_dir())
    for other in (local, hub, reloaded):
        for (name, a), (_, b) in zip(other.model.state_dict().items(), clip.model.state_dict().items()):
            assert torch.equal(a, b), name


def test_torch_files_are_read_with_weights_only(weights, tmp_path, monkeypatch, clip):
    calls: list[object] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    path = tmp_path / "rn_tiny.pt"
    # no BatchNorm counters, as some exports write it: they default to this model's
    torch.save({k: v for k, v in weights["state"].items() if not k.endswith("num_batches_tracked")}, path)
    loaded = CLIPResNetBackbone(checkpoint_path=str(path), tokenizer=tiny_clip_dir())
    assert calls and all(flag is True for flag in calls)
    torch.testing.assert_close(loaded.model.text_projection.weight, clip.model.text_projection.weight, atol=0, rtol=0)


def test_clear_errors(weights, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time, before conftest sets the variable
    tok = tiny_clip_dir()
    scripted = tmp_path / "RN50.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(scripted))
    with pytest.raises(ValueError, match="TorchScript archive.*open_clip_model.safetensors"):
        CLIPResNetBackbone(checkpoint_path=str(scripted), tokenizer=tok)

    state = weights["state"]

    def without(key: str) -> dict[str, Tensor]:
        return {k: v for k, v in state.items() if k != key}

    bad_files = [  # (file content, what the error must say)
        (without("transformer.resblocks.1.mlp.c_fc.weight"),
         r"missing keys: transformer\.resblocks\.1\.mlp\.c_fc\.weight"),
        ({**state, "transformer.resblocks.0.attn.bias_k": torch.zeros(1)},
         r"unexpected keys: transformer\.resblocks\.0\.attn\.bias_k"),
        (without("visual.layer2.1.conv2.weight"), r"missing keys: visual\.stages\.1\.1\.conv2_kxk\.conv\.weight"),
        ({**state, "visual.attnpool.q_proj.bias": torch.zeros(300)},
         r"shape mismatches: visual\.head\.q\.bias: file \(300,\) vs model \(256,\)"),
        ({"visual.class_embedding": torch.zeros(8), "visual.conv1.weight": torch.zeros(8, 3, 4, 4)},
         "ViT CLIP.*HFCLIPBackbone"),
    ]
    for i, (content, message) in enumerate(bad_files):
        save_file(content, str(tmp_path / f"bad{i}.safetensors"))
        with pytest.raises(ValueError, match=message):
            CLIPResNetBackbone(checkpoint_path=str(tmp_path / f"bad{i}.safetensors"), tokenizer=tok)
    with pytest.raises(ValueError, match="model_name_or_path.*checkpoint_path.*config="):
        CLIPResNetBackbone(tokenizer=tok)
    with pytest.raises(ValueError, match=r"unknown CLIPResNetBackbone config keys \['layers'\]"):
        CLIPResNetBackbone(config={"layers": 3}, tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="has no open_clip_model.safetensors"):
        CLIPResNetBackbone(model_name_or_path=str(tmp_path), tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="could not get open_clip_model.safetensors from the hub"):
        CLIPResNetBackbone(model_name_or_path="timm/resnet50_clip.openai", tokenizer=tok)


# ---- recipes -----------------------------------------------------------------------------------------------
COOP_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]


def test_rn50_recipes_are_the_vit_b16_recipes_on_rn50():
    import yaml

    from tests.conftest import REPO

    for key in COOP_DATASETS:
        rn50 = yaml.safe_load((REPO / "configs" / "experiment" / f"coop_rn50_{key}.yaml").read_text())
        vit = yaml.safe_load((REPO / "configs" / "experiment" / f"coop_vit_b16_{key}.yaml").read_text())
        assert rn50["model"].pop("backbone") == {
            "class_path": "lightning_transfer.backbones.clip_resnet.CLIPResNetBackbone",
            "init_args": {"model_name_or_path": "timm/resnet50_clip.openai",
                          "tokenizer": "openai/clip-vit-base-patch32"}}, key
        vit["model"].pop("backbone")
        assert rn50["trainer"]["logger"]["init_args"].pop("name") == f"coop_rn50_{key}_16shot"
        vit["trainer"]["logger"]["init_args"].pop("name")
        assert rn50 == vit, key  # same data, prompts, optimizer, schedule and epochs as the paper-settings recipe


def test_an_rn50_recipe_fits_on_coop_data(weights, tmp_path):
    from lightning_transfer.cli import TransferCLI
    from tests.conftest import REPO
    from tests.helpers.coop_data import coop_pets

    coop_pets(tmp_path / "data")
    folder = tmp_path / "rn50"
    folder.mkdir()
    save_file(weights["state"], str(folder / WEIGHTS_FILE))
    cli = TransferCLI(args=[
        "fit", "--config", str(REPO / "configs/experiment/coop_rn50_oxford_pets.yaml"),
        f"--model.backbone.init_args.model_name_or_path={folder}",
        f"--model.backbone.init_args.tokenizer={tiny_clip_dir()}",
        f"--data.init_args.data_dir={tmp_path / 'data'}",
        "--model.adaptation.init_args.n_ctx=4",  # the tiny vocabulary spells most words letter by letter
        "--data.init_args.num_shots=1", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
        "--trainer.precision=32-true", "--trainer.max_epochs=1", "--trainer.logger=false", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false"])
    assert isinstance(cli.model.backbone, CLIPResNetBackbone)
    assert cli.datamodule.data_config()["input_size"] == (3, RESOLUTION, RESOLUTION)
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
