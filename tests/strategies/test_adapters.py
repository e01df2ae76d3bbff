"""Adapter placements against slow references written from the equations (Houlsby, AdaptFormer, FFN-only)."""

from __future__ import annotations

import pytest
import torch

from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.adapters import Adapter, adapted_output
from tests.helpers.models import inputs_for, tiny_cnn, tiny_vit
from tests.helpers.text_models import tiny_bert, token_inputs


def _perturb(strategy: Adapter) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in strategy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _vit_block_reference(block, x, strategy: Adapter, i: int):
    """The pre-LN ViT block written out with the adapter equations of specs/algorithms.md 6.2-6.3.

    ``.forward`` calls bypass the strategy's hooks, so this is the plain block plus the equations.
    """
    s = strategy.scale
    a = block.attn.forward(block.norm1(x))
    if strategy.placement == "sequential":
        a = a + s * strategy.attn_adapters[i](a)
    x1 = x + a  # x', the post-attention stream
    m = block.mlp.forward(block.norm2.forward(x1))
    if strategy.placement == "parallel":
        return x1 + m + s * strategy.ffn_adapters[i](x1)  # reads x', not LN2(x')
    return x1 + m + s * strategy.ffn_adapters[i](m)


@pytest.mark.parametrize("placement", ["parallel", "sequential", "ffn"])
def test_vit_placements_match_the_equations(placement):
    module = TransferModule(tiny_vit(), Adapter(bottleneck=4, placement=placement, scale=0.5), num_classes=5).eval()
    strategy = module.adaptation
    _perturb(strategy)
    backbone = module.backbone
    x = inputs_for(backbone)
    with torch.no_grad():
        tokens = backbone.embed(x)
        for i in range(backbone.depth):
            block = backbone.blocks[i]
            expected = _vit_block_reference(block, tokens, strategy, i)
            tokens = backbone.run_block(i, tokens)
            torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=0)
    expected_adapters = backbone.depth * (2 if placement == "sequential" else 1)
    assert len(strategy.attn_adapters) + len(strategy.ffn_adapters) == expected_adapters


def test_parallel_adapter_on_bert_reads_the_attention_output():
    backbone = tiny_bert()
    module = TransferModule(backbone, Adapter(bottleneck=4, placement="parallel", scale=2.0), num_classes=3).eval()
    strategy = module.adaptation
    _perturb(strategy)
    ids = token_inputs(backbone)
    with torch.no_grad():
        tokens = backbone.embed(ids)
        layer = backbone.blocks[0]
        mask = (1.0 - (ids != 0).float()[:, None, None, :]) * torch.finfo(torch.float32).min
        a = layer.attention(tokens, mask)[0]  # post-attention stream (after its LayerNorm: BERT is post-LN)
        out = layer.output
        h = out.dense.forward(layer.intermediate.forward(a)) + 2.0 * strategy.ffn_adapters[0](a)
        expected = out.LayerNorm(h + a)
        torch.testing.assert_close(backbone.run_block(0, tokens), expected, atol=1e-5, rtol=0)


def test_identity_at_init_is_exact_and_parameter_count_matches_the_formula():
    dim, depth, m = 64, 6, 16
    module = TransferModule(tiny_vit(), Adapter(bottleneck=m), num_classes=5).eval()
    x = inputs_for(module.backbone)
    with torch.no_grad():
        assert torch.equal(module.backbone(x), tiny_vit().eval()(x))
    adapter_params = sum(p.numel() for p in module.adaptation.parameters())
    assert adapter_params == depth * (2 * m * dim + m + dim)  # AdaptFormer: 1.19M at ViT-B, m=64


def test_adapted_output_formula():
    out, stream = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    adapter = torch.nn.Linear(4, 4)
    torch.testing.assert_close(adapted_output(out, stream, adapter, 0.1), out + 0.1 * adapter(stream))


def test_adapter_errors_name_the_fix():
    with pytest.raises(ValueError, match="token backbone"):
        TransferModule(tiny_cnn(), Adapter(), num_classes=5)
    with pytest.raises(ValueError, match="placement"):
        Adapter(placement="prefix")  # type: ignore[arg-type]
    module = TransferModule(tiny_vit(), Adapter(bottleneck=4), num_classes=5)
    with pytest.raises(ValueError, match="cannot be folded"):
        module.adaptation.merged_backbone_state(module.backbone)
    assert Adapter(placement="sequential").scale == 1.0 and Adapter().scale == 0.1


@pytest.mark.parametrize("scale", [0.0, float("nan"), float("inf")])
def test_a_zero_or_non_finite_scale_is_refused(scale):
    # s = 0 cuts the adapter off: its output is always zero and it never gets a gradient
    with pytest.raises(ValueError, match=f"scale must be a finite non-zero number, got {scale}"):
        Adapter(scale=scale)
