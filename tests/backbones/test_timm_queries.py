"""Query tokens through timm ViT blocks (``run_block_with_queries``) and gradient-free hidden states."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.backbones.timm import TimmBackbone

# plain blocks, and blocks with q/k norm + layer scale (every submodule of the query path is exercised)
SPECS = {
    "plain": {"model_name": "test_vit", "model_kwargs": {"img_size": 32, "patch_size": 8}},
    "qknorm_layerscale": {"model_name": "test_vit",
                          "model_kwargs": {"img_size": 32, "patch_size": 8, "qk_norm": True, "init_values": 0.5}},
}


def _setup(name: str, batch: int = 2, num_queries: int = 3):
    torch.manual_seed(0)
    backbone = TimmBackbone(**SPECS[name]).eval()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    queries = torch.randn(batch, num_queries, backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    return backbone, x, queries


def masked_concat_reference(backbone: TimmBackbone, index: int, tokens: Tensor, queries: Tensor):
    """Slow reference: run the plain block on [queries; tokens] with every query key column blocked."""
    t, n = queries.shape[1], tokens.shape[1]
    allowed = torch.ones(t + n, t + n, dtype=torch.bool)
    allowed[:, :t] = False  # nobody (queries included) attends to a query token
    out = backbone.blocks[index](torch.cat([queries, tokens], 1), attn_mask=allowed)
    return out[:, t:], out[:, :t]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tokens_bit_identical_and_queries_match_masked_reference(name):
    backbone, x, queries = _setup(name)
    with torch.no_grad():
        plain = backbone.forward_tokens(x, return_hidden_states=True).hidden_states
        tokens = backbone.embed(x)
        for i in range(backbone.depth):
            tokens, out = backbone.run_block_with_queries(i, tokens, queries)
            assert torch.equal(tokens, plain[i + 1]), f"block {i}: original tokens differ from the plain backbone"
            ref_tokens, ref_out = masked_concat_reference(backbone, i, plain[i], queries)
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
            torch.testing.assert_close(ref_tokens, plain[i + 1], atol=1e-5, rtol=0)  # the mask isolates tokens


def test_queries_do_not_attend_to_each_other():
    backbone, x, queries = _setup("plain")
    with torch.no_grad():
        tokens = backbone.embed(x)
        _, together = backbone.run_block_with_queries(0, tokens, queries)
        alone = torch.cat([backbone.run_block_with_queries(0, tokens, queries[:, j:j + 1])[1] for j in range(3)], 1)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_gradient_reaches_queries_only_and_trunk_records_nothing():
    backbone, x, queries = _setup("qknorm_layerscale")
    backbone.requires_grad_(False)
    tokens = backbone.embed(x).requires_grad_(True)  # even a grad-carrying input gets no gradient back
    queries.requires_grad_(True)
    saved: list[tuple[int, ...]] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tokens_out, out = backbone.run_block_with_queries(0, tokens, queries)
    assert not tokens_out.requires_grad, "the token path must run without gradient"
    out.square().sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert tokens.grad is None, "the query path back-propagated into the original tokens"
    b, n = tokens.shape[:2]
    # only the block input (B, N, D) is kept (keys and values are recomputed); nothing else spans the N tokens
    with_n = [s for s in saved if n in s[1:] and s[0] == b]
    assert with_n == [(b, n, backbone.embed_dim)], with_n


@pytest.mark.parametrize("name", sorted(SPECS))
def test_query_gradient_equals_masked_reference_gradient(name):
    backbone, x, queries = _setup(name)
    backbone.requires_grad_(False)
    with torch.no_grad():
        tokens = backbone.blocks[0](backbone.embed(x))
    weights = torch.randn(queries.shape, generator=torch.Generator().manual_seed(5))
    ours = queries.clone().requires_grad_(True)
    (backbone.run_block_with_queries(1, tokens, ours)[1] * weights).sum().backward()
    ref = queries.clone().requires_grad_(True)
    (masked_concat_reference(backbone, 1, tokens, ref)[1] * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_hidden_states_are_gradient_free_and_match_forward_tokens():
    backbone, x, _ = _setup("plain")
    reference = backbone.forward_tokens(x, return_hidden_states=True).hidden_states
    states = backbone.hidden_states(x, num_blocks=1)
    assert len(states) == 2 and not any(s.requires_grad for s in states)
    assert all(torch.equal(a, b) for a, b in zip(states, reference))
    assert len(backbone.hidden_states(x)) == backbone.depth + 1
    with pytest.raises(ValueError, match="num_blocks must be in"):
        backbone.hidden_states(x, num_blocks=backbone.depth + 1)


def test_backbones_without_query_support_fail_clearly():
    cnn = TimmBackbone("test_resnet", data_config={"input_size": [3, 32, 32]})
    assert not cnn.supports_queries
    assert TimmBackbone(**SPECS["plain"]).supports_queries
    with pytest.raises(NotImplementedError, match="cannot run query tokens"):
        cnn.run_block_with_queries(0, torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 8))

    class Bare(Backbone):
        name = "bare"

    with pytest.raises(NotImplementedError, match=r"Bare \(bare\) does not implement run_block_with_queries"):
        Bare().run_block_with_queries(0, torch.zeros(1, 2, 4), torch.zeros(1, 1, 4))
