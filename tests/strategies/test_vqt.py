"""VQT: logits against a slow masked-attention reference, frozen trunk, memory, feature selection, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.backbones.hf_clip import HFCLIPBackbone
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.vqt import VQT, group_lasso_penalty, select_top_features, vqt_features
from tests.helpers.models import inputs_for, tiny_cnn, tiny_vit
from tests.helpers.text_models import tiny_bert, token_inputs
from tests.helpers.tiny_clip import tiny_clip


def _module(**kwargs) -> TransferModule:
    return TransferModule(tiny_vit(), VQT(**{"query_dropout": 0.0, **kwargs}), num_classes=5)


def slow_reference_logits(module: TransferModule, x: Tensor, pooling: str = "concat") -> Tensor:
    """The official formulation: queries concatenated in front of the tokens, their key columns blocked."""
    backbone, queries = module.backbone, module.adaptation.queries  # (L, T, D)
    tokens = backbone.embed(x)
    pieces = []
    t = queries.shape[1]
    for layer, block in enumerate(backbone.blocks):
        z = torch.cat([queries[layer].expand(len(x), -1, -1), tokens], 1)  # (B, T + N, D)
        allowed = torch.ones(z.shape[1], z.shape[1], dtype=torch.bool)
        allowed[:, :t] = False
        z = block(z, attn_mask=allowed)
        out, tokens = z[:, :t], z[:, t:]
        piece = out.flatten(1) if pooling == "concat" else out.mean(1)
        pieces.append(piece / piece.norm(dim=-1, keepdim=True))
    cls = backbone.model.norm(tokens)[:, 0]
    feats = torch.cat([cls / cls.norm(dim=-1, keepdim=True), *pieces], 1)
    return module.head(feats)


@pytest.mark.parametrize(("num_queries", "pooling"), [(1, "concat"), (4, "concat"), (3, "mean")])
def test_logits_equal_masked_concat_reference(num_queries, pooling):
    module = _module(num_queries=num_queries, pooling=pooling).eval()
    x = inputs_for(module.backbone, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(module(x), slow_reference_logits(module, x, pooling), atol=1e-5, rtol=0)
    width = 64 + 6 * (num_queries * 64 if pooling == "concat" else 64)
    assert module.head.fc.in_features == width == module.adaptation.head_in_features(module.backbone)


# ---- Hugging Face backbones: CLIP image tower, BERT (padded batches) --------------------------------------
def _hf_module(name: str, num_queries: int = 2, **backbone_kwargs) -> tuple[TransferModule, Tensor, Tensor]:
    """VQT on a tiny HF backbone, its inputs and their key-padding mask (B, N)."""
    backbone: Backbone = tiny_clip() if name == "clip" else tiny_bert(**backbone_kwargs)
    module = TransferModule(backbone, VQT(num_queries=num_queries, query_dropout=0.0), num_classes=5)
    if name == "clip":
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        return module, x, torch.ones(3, 1 + (16 // 4) ** 2, dtype=torch.bool)
    ids = token_inputs(module.backbone, batch=3)  # right padding of different lengths
    return module, ids, ids != module.backbone.pad_token_id


def slow_reference_logits_hf(module: TransferModule, inputs: Tensor, keep: Tensor) -> Tensor:
    """Queries concatenated in front of the tokens through each HF layer's own forward; query (and padded) key
    columns blocked by an additive mask, as the official code effectively does."""
    backbone, queries = module.backbone, module.adaptation.queries  # (L, T, D)
    tokens = backbone.embed(inputs)  # (B, N, D)
    (b, n, _), t = tokens.shape, queries.shape[1]
    allowed = torch.ones(b, t + n, t + n, dtype=torch.bool)
    allowed[:, :, :t] = False
    allowed[:, :, t:] &= keep[:, None, :]
    mask = (~allowed)[:, None].float() * torch.finfo(torch.float32).min  # (B, 1, T + N, T + N)
    pieces = []
    for layer, block in enumerate(backbone.blocks):
        z = block(torch.cat([queries[layer].expand(b, -1, -1), tokens], 1), mask)
        z = z[0] if isinstance(z, tuple) else z
        out, tokens = z[:, :t], z[:, t:]
        pieces.append(F.normalize(out.flatten(1), dim=-1))
    if isinstance(backbone, HFCLIPBackbone):  # CLIP: the post-layernorm CLS = HF's pooler_output
        cls = backbone.model.vision_model.post_layernorm(tokens[:, 0])
    else:  # BERT with cls pooling: the [CLS] token
        cls = tokens[:, 0]
    return module.head(torch.cat([F.normalize(cls, dim=-1), *pieces], 1))


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_hf_logits_equal_masked_concat_reference(name):
    module, inputs, keep = _hf_module(name)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(inputs), slow_reference_logits_hf(module, inputs, keep), atol=1e-5, rtol=0)
    dim = module.backbone.embed_dim
    assert module.head.fc.in_features == dim + module.backbone.depth * 2 * dim


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_hf_trunk_unchanged_records_nothing_and_only_queries_and_head_learn(name):
    module, inputs, _ = _hf_module(name)
    module.train()
    plain = module.backbone.forward_tokens(inputs, return_hidden_states=True).hidden_states
    outputs: list[Tensor] = []
    counts: list[int] = []

    def pre(block, args):
        block._counter = torch.autograd.graph.saved_tensors_hooks(lambda t: counts.append(t.numel()) or t, lambda t: t)
        block._counter.__enter__()

    def post(block, args, out):
        block._counter.__exit__(None, None, None)
        outputs.append(out[0] if isinstance(out, tuple) else out)

    for block in module.backbone.blocks:
        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    logits = module(inputs)
    depth = module.backbone.depth
    assert not counts, "a frozen VQT block recorded activations for backward"
    assert len(outputs) == depth and not any(o.requires_grad for o in outputs)
    assert all(torch.equal(o, p) for o, p in zip(outputs, plain[1:])), "VQT changed the original tokens"
    module.adaptation.loss(logits, (inputs, torch.arange(3))).backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"adaptation.queries", "head.fc.weight", "head.fc.bias"}, trainable
    assert module.adaptation.queries.grad.abs().sum(dim=(1, 2)).gt(0).all(), "every layer's queries learn"
    assert module.head.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bert_padded_batch_equals_each_example_alone(pooling):
    module, ids, keep = _hf_module("bert", pooling=pooling)
    module.eval()
    with torch.no_grad():
        batched = module(ids)
        for i in range(len(ids)):
            alone = module(ids[i:i + 1, : int(keep[i].sum())])  # the same example without padding
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)


def test_trunk_is_unchanged_and_records_nothing_for_backward():
    module = _module(num_queries=2).train()
    x = inputs_for(module.backbone, batch=4)
    plain = module.backbone.forward_tokens(x, return_hidden_states=True).hidden_states
    outputs: list[Tensor] = []
    counts: list[int] = []

    def pre(block, args):
        block._counter = torch.autograd.graph.saved_tensors_hooks(lambda t: counts.append(t.numel()) or t, lambda t: t)
        block._counter.__enter__()

    def post(block, args, out):
        block._counter.__exit__(None, None, None)
        outputs.append(out)

    for block in module.backbone.blocks:
        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    logits = module(x)
    assert not counts, "a frozen VQT block recorded activations for backward"
    assert len(outputs) == 6 and not any(o.requires_grad for o in outputs)
    assert all(torch.equal(o, p) for o, p in zip(outputs, plain[1:])), "VQT changed the original tokens"
    # gradients reach the queries and the head only
    module.adaptation.loss(logits, (x, torch.arange(4) % 5)).backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    assert module.adaptation.queries.grad.abs().sum(dim=(1, 2)).gt(0).all(), "every layer's queries learn"
    assert module.head.fc.weight.grad.abs().sum() > 0


def test_saved_bytes_hold_only_keys_values_and_query_rows():
    module = _module(num_queries=1).train()
    x = inputs_for(module.backbone, batch=4)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        module(x)
    n = module.backbone.embed(x).shape[1]
    spanning = [s for s in saved if len(s) >= 3 and s[0] == 4 and n in s[1:]]
    # one (B, N, D) block input per block (keys and values are recomputed in backward), nothing else that wide
    assert spanning == [(4, n, module.backbone.embed_dim)] * module.backbone.depth, spanning


def test_query_dropout_only_in_training():
    module = _module(query_dropout=0.5)
    x = inputs_for(module.backbone)
    module.train()
    assert not torch.equal(module(x), module(x))
    module.eval()
    assert torch.equal(module(x), module(x))
    assert not module.backbone.training, "the frozen backbone stays in eval mode"


def test_feature_pieces_are_unit_norm():
    cls, outs = torch.randn(2, 5), [torch.randn(2, 3, 4) for _ in range(2)]
    feats = vqt_features(cls, outs)
    assert feats.shape == (2, 5 + 2 * 12)
    norms = torch.stack([feats[:, :5].norm(dim=1), feats[:, 5:17].norm(dim=1), feats[:, 17:].norm(dim=1)])
    torch.testing.assert_close(norms, torch.ones(3, 2))
    torch.testing.assert_close(vqt_features(cls, outs, "mean", normalize=False)[:, 5:9], outs[0].mean(1))


def test_group_lasso_and_selection_match_loops():
    weight = torch.randn(4, 9)
    reference = sum(math.sqrt(sum(weight[c, j].item() ** 2 for c in range(4))) for j in range(9))
    assert group_lasso_penalty(weight).item() == pytest.approx(reference, rel=1e-5)
    weight[:, [1, 5, 7]] *= 100
    assert select_top_features(weight, 0.34).tolist() == [1, 5, 7]
    with pytest.raises(ValueError, match="keeps no feature"):
        select_top_features(weight, 0.01)
    module = _module(group_lasso=0.1)
    x, y = inputs_for(module.backbone), torch.arange(4)
    logits = module(x)
    added = module.adaptation.loss(logits, (x, y)) - F.cross_entropy(logits, y)
    assert added.item() == pytest.approx(0.1 * group_lasso_penalty(module.head.fc.weight).item(), rel=1e-5)


def test_three_stage_feature_selection(tmp_path):
    stage_a = _module(num_queries=2)
    torch.nn.init.normal_(stage_a.adaptation.queries)
    torch.save({"state_dict": stage_a.state_dict()}, tmp_path / "a.ckpt")
    stage_b = _module(num_queries=2, group_lasso=1e-4, init_from=str(tmp_path / "a.ckpt"))
    assert torch.equal(stage_b.adaptation.queries, stage_a.adaptation.queries)
    torch.save({"state_dict": stage_b.state_dict()}, tmp_path / "b.ckpt")
    stage_c = _module(num_queries=2, keep_fraction=0.5, init_from=str(tmp_path / "a.ckpt"),
                      select_features_from=str(tmp_path / "b.ckpt")).eval()
    full = stage_a.adaptation.full_in_features(stage_a.backbone)
    assert stage_c.head.fc.in_features == full // 2
    expected = select_top_features(stage_b.head.fc.weight, 0.5)
    assert torch.equal(stage_c.adaptation.selected_features, expected)
    x = inputs_for(stage_c.backbone)
    with torch.no_grad():
        all_feats = stage_a.eval().adaptation.features(stage_a.backbone, x)
        torch.testing.assert_close(stage_c.adaptation.features(stage_c.backbone, x), all_feats[:, expected])
    # the selection travels in the state dict: a rebuilt stage-3 model reloads strictly
    again = _module(num_queries=2, keep_fraction=0.5, init_from=str(tmp_path / "a.ckpt"),
                    select_features_from=str(tmp_path / "b.ckpt"))
    again.load_state_dict(stage_c.state_dict(), strict=True)
    with pytest.raises(ValueError, match="init_from queries have shape"):
        _module(num_queries=3, init_from=str(tmp_path / "a.ckpt"))


def test_clear_errors_at_construction():
    with pytest.raises(ValueError, match=r"needs a token backbone.*FullFinetune"):
        TransferModule(tiny_cnn(), VQT(), num_classes=5)
    with pytest.raises(ValueError, match="keep_fraction and select_features_from go together"):
        VQT(keep_fraction=0.7)
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        VQT(num_queries=0)
    with pytest.raises(ValueError, match="pooling must be"):
        VQT(pooling="max")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransferModule(tiny_vit(), VQT(init_from="missing.ckpt"), num_classes=5)


def test_vtab_recipe_builds_with_the_paper_schedule(tmp_path):
    import yaml

    from lightning_transfer.cli import TransferCLI
    from lightning_transfer.datamodules.vtab import VTAB_TASKS, VTAB1k
    from tests.conftest import REPO

    overlays = REPO / "configs/experiment/vqt_vtab"
    assert sorted(p.stem for p in overlays.glob("*.yaml")) == sorted(VTAB_TASKS)  # one per task
    queries = {p.stem: yaml.safe_load(p.read_text())["model"]["adaptation"]["init_args"]["num_queries"]
               for p in overlays.glob("*.yaml")}
    assert {t for t, q in queries.items() if q == 20} == {"svhn", "dmlab", "dsprites_loc", "smallnorb_azi", "kitti"}
    assert {t for t, q in queries.items() if q == 10} == {"clevr_dist", "smallnorb_ele"}
    cli = TransferCLI(args=["--config", str(REPO / "configs/experiment/vit_b16_vqt_vtab.yaml"),
                            "--config", str(overlays / "svhn.yaml"),
                            "--model.backbone.init_args.pretrained=false",  # offline: same architecture, no download
                            "--model.backbone.init_args.model_kwargs={depth: 2}",
                            f"--data.init_args.data_dir={tmp_path}", "--trainer.logger=false"], run=False)
    assert isinstance(cli.datamodule, VTAB1k) and cli.datamodule.num_classes == 10 and cli.model.num_classes == 10
    assert isinstance(cli.model.adaptation, VQT) and cli.model.adaptation.num_queries == 20
    assert cli.trainer.max_epochs == 100 and cli.datamodule.batch_size == 128
    assert cli.model.backbone.data_config()["input_size"] == (3, 224, 224)
    configured = cli.model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.Adam and configured["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(100):  # one scheduler step per epoch, as Lightning does
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(0.125) and lrs.index(max(lrs)) == 9  # warm-up over epochs 1-10
    assert lrs[0] < 0.01 and lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("init_scale", [0.0, -1.0, float("nan")])
def test_a_non_positive_init_scale_is_refused(init_scale):
    with pytest.raises(ValueError, match=f"init_scale must be > 0 .*got {init_scale}"):
        VQT(init_scale=init_scale)
