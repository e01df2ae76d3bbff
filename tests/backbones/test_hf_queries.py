"""Query tokens through Hugging Face CLIP and BERT layers (``run_block_with_queries``), gradient-free hidden states.

The reference is the official formulation: the queries concatenated in front of the tokens and run through the
layer's own forward, with an additive mask that blocks every query key column (and, for BERT, every padded one).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.backbones.hf_text import HFTextBackbone
from tests.helpers.text_models import tiny_bert, token_inputs
from tests.helpers.tiny_clip import tiny_clip

NUM_QUERIES = 3


def _setup(name: str, batch: int = 3) -> tuple[Backbone, Tensor, Tensor, Tensor]:
    """Backbone, its inputs, the key-padding mask (B, N) of those inputs and random queries (B, T, D)."""
    if name == "clip":
        backbone: Backbone = tiny_clip().eval()
        inputs = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        n = backbone.embed(inputs).shape[1]
        keep = torch.ones(batch, n, dtype=torch.bool)
    else:
        backbone = tiny_bert(attn_implementation=name.split("-")[1]).eval()
        inputs = token_inputs(backbone, batch=batch)  # right padding of different lengths
        keep = inputs != backbone.pad_token_id
        assert not keep.all(), "the BERT inputs must hold padding"
    queries = torch.randn(batch, NUM_QUERIES, backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    return backbone, inputs, keep, queries


def concat_reference(backbone: Backbone, index: int, tokens: Tensor, queries: Tensor,
                     keep: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's own forward on [queries; tokens] with query and padded key columns blocked for every row."""
    b, t, n = tokens.shape[0], queries.shape[1], tokens.shape[1]
    allowed = torch.ones(b, t + n, t + n, dtype=torch.bool)
    allowed[:, :, :t] = False  # nobody (queries included) reads a query token
    allowed[:, :, t:] &= keep[:, None, :]  # nobody reads a padded token
    mask = (~allowed)[:, None].to(tokens.dtype) * torch.finfo(tokens.dtype).min  # (B, 1, T + N, T + N)
    out = backbone.blocks[index](torch.cat([queries, tokens], 1), mask)
    out = out[0] if isinstance(out, tuple) else out
    return out[:, t:], out[:, :t]  # tokens (B, N, D), queries (B, T, D)


NAMES = ["clip", "bert-sdpa", "bert-eager"]


@pytest.mark.parametrize("name", NAMES)
def test_tokens_bit_identical_and_queries_match_concat_reference(name):
    backbone, inputs, keep, queries = _setup(name)
    with torch.no_grad():
        plain = backbone.forward_tokens(inputs, return_hidden_states=True).hidden_states
        tokens = backbone.embed(inputs)
        for i in range(backbone.depth):
            expected = backbone.run_block(i, tokens)
            tokens, out = backbone.run_block_with_queries(i, tokens, queries)
            assert torch.equal(tokens, expected) and torch.equal(tokens, plain[i + 1]), f"layer {i}: tokens differ"
            ref_tokens, ref_out = concat_reference(backbone, i, plain[i], queries, keep)
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
            torch.testing.assert_close(ref_tokens, plain[i + 1], atol=1e-5, rtol=0)  # the mask isolates the tokens


@pytest.mark.parametrize("name", ["clip", "bert-sdpa"])
def test_query_gradient_equals_concat_reference_gradient(name):
    backbone, inputs, keep, queries = _setup(name)
    backbone.requires_grad_(False)
    with torch.no_grad():
        tokens = backbone.run_block(0, backbone.embed(inputs))
    weights = torch.randn(queries.shape, generator=torch.Generator().manual_seed(5))
    ours = queries.clone().requires_grad_(True)
    (backbone.run_block_with_queries(1, tokens, ours)[1] * weights).sum().backward()
    ref = queries.clone().requires_grad_(True)
    (concat_reference(backbone, 1, tokens, ref, keep)[1] * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["clip", "bert-sdpa"])
def test_gradient_reaches_queries_only_and_trunk_saves_nothing(name):
    backbone, inputs, _, queries = _setup(name)
    backbone.requires_grad_(False)
    tokens = backbone.embed(inputs).detach().requires_grad_(True)  # even a grad-carrying input gets no gradient
    queries.requires_grad_(True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        tokens_out, out = backbone.run_block_with_queries(0, tokens, queries)
    assert not tokens_out.requires_grad, "the token path must run without gradient"
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert tokens.grad is None, "the query path back-propagated into the original tokens"
    assert all(p.grad is None for p in backbone.parameters())
    b, n, d = tokens.shape
    # only the block input (and BERT's (B, 1, 1, N) padding mask) spans the N tokens: keys, values and the
    # attention weights are recomputed in backward, nothing of the plain layer is kept
    spanning = [s for s in saved if len(s) >= 3 and s[0] == b and n in s[1:]]
    expected = [(b, n, d)] + ([(b, 1, 1, n)] if isinstance(backbone, HFTextBackbone) else [])
    assert sorted(spanning) == sorted(expected), spanning


@pytest.mark.parametrize("name", ["clip", "bert-sdpa"])
def test_backward_under_mixed_precision_recomputes_in_the_forward_dtype(name):
    backbone, inputs, _, queries = _setup(name)
    backbone.requires_grad_(False)
    with torch.no_grad():
        tokens = backbone.embed(inputs)
    weights = torch.randn(queries.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for enabled in (False, True):
        q = queries.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = backbone.run_block_with_queries(0, tokens, q)[1]
        (out.float() * weights).sum().backward()  # bf16 q against fp32 recomputed keys would fail here
        grads.append(q.grad.flatten())
    assert torch.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.parametrize("name", ["clip", "bert-sdpa"])
def test_hidden_states_are_gradient_free_and_match_forward_tokens(name):
    backbone, inputs, _, _ = _setup(name)
    reference = backbone.forward_tokens(inputs, return_hidden_states=True).hidden_states
    states = backbone.hidden_states(inputs)
    assert len(states) == backbone.depth + 1 and not any(s.requires_grad for s in states)
    assert all(torch.equal(a, b) for a, b in zip(states, reference))


def test_bert_queries_ignore_padded_positions():
    backbone, inputs, keep, queries = _setup("bert-sdpa")
    row = 2  # its last positions are padding
    assert not keep[row].all()
    with torch.no_grad():
        tokens = backbone.embed(inputs)
        _, out = backbone.run_block_with_queries(0, tokens, queries)
        noisy = tokens.clone()
        noisy[row, ~keep[row]] = torch.randn_like(noisy[row, ~keep[row]]) * 10  # garbage where the padding is
        _, again = backbone.run_block_with_queries(0, noisy, queries)
        unmasked = backbone.run_block_with_queries(0, tokens, queries, attn_mask=torch.zeros(3, 1, 1, tokens.shape[1]))
    torch.testing.assert_close(again, out, atol=1e-6, rtol=0)
    assert not torch.allclose(unmasked[1][row], out[row], atol=1e-4), "the padding mask changed nothing"
    with pytest.raises(ValueError, match="key mask of shape"):
        backbone.run_block_with_queries(0, tokens, queries, attn_mask=torch.zeros(3, 1, tokens.shape[1], 12))


def test_supports_queries_flags():
    assert tiny_clip().supports_queries and tiny_bert().supports_queries
    backbone = tiny_bert()
    layer = backbone.blocks[0]
    del layer.intermediate  # no longer a BERT-style layer
    assert not backbone.supports_queries
    with pytest.raises(NotImplementedError, match="have no intermediate"):
        backbone.run_block_with_queries(0, torch.zeros(1, 2, 32), torch.zeros(1, 1, 32))
