"""SHERL: anti-redundancy weights against a per-token loop, the gate, gradient routes and memory, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_transfer.callbacks.efficiency import saved_bytes
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.strategies.sherl import SHERL, aggregate, anti_redundancy_weights, redundancy
from tests.helpers.models import inputs_for, tiny_cnn, tiny_vit
from tests.helpers.text_models import tiny_bert, token_inputs


def _module(**kwargs) -> TransferModule:
    return TransferModule(tiny_vit(), SHERL(**kwargs), num_classes=5)


def slow_early_route(strategy: SHERL, hidden: list[Tensor]) -> Tensor:
    """Per token and per layer pair, with explicit cosines: the formulas of the notes, one number at a time."""
    batch, tokens, _ = hidden[0].shape
    w, b = strategy.score.weight[0], strategy.score.bias[0]
    gate = torch.tanh(strategy.gamma / strategy.gate_temperature)
    out = torch.empty_like(hidden[-1])
    for bi in range(batch):
        for ni in range(tokens):
            s = [phi(h[bi, ni]) for phi, h in zip(strategy.projections, hidden)]  # each (d,)
            shallow, g = s[:-1], s[-1]
            unit = [v / max(v.norm().item(), 1e-6) for v in shallow]
            a = []
            for i, si in enumerate(shallow):
                r = sum(max(float(unit[i] @ unit[j]), 0.0) for j in range(len(shallow)))
                a.append(max(float(w @ (si * g) + b), 0.0) / r)
            total = sum(abs(v) for v in a) + 1e-6
            z = g + sum((ai / total) * si for ai, si in zip(a, shallow))
            out[bi, ni] = strategy.out(z.relu()) + gate * hidden[-1][bi, ni]
    return out


def test_weights_and_aggregation_match_per_token_loop():
    gen = torch.Generator().manual_seed(3)
    shallow, guide = torch.randn(4, 2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    w, b = torch.randn(5, generator=gen), torch.tensor(0.3)
    alpha = anti_redundancy_weights(shallow, guide, w, b)
    for bi in range(2):
        for ni in range(3):
            vecs = [shallow[i, bi, ni] for i in range(4)]
            r = [sum(max(float(torch.cosine_similarity(u, v, dim=0)), 0.0) for v in vecs) for u in vecs]
            assert redundancy(shallow)[:, bi, ni].tolist() == pytest.approx(r, rel=1e-5)
            a = [max(float(w @ (v * guide[bi, ni]) + b), 0.0) / ri for v, ri in zip(vecs, r)]
            expected = [ai / (sum(abs(x) for x in a) + 1e-6) for ai in a]
            assert alpha[:, bi, ni].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(aggregate(shallow, guide, alpha), (alpha[..., None] * shallow).sum(0) + guide)
    assert redundancy(shallow).min() >= 1 - 1e-5  # each feature is fully redundant with itself


@pytest.mark.parametrize("projection", ["gated", "linear_norm", "relu_linear"])
def test_early_route_matches_slow_reference(projection):
    module = _module(projection=projection, late_blocks=2).eval()
    with torch.no_grad():
        module.adaptation.gamma.fill_(0.05)  # open the gate a little so the h_K copy is checked too
        hidden = list(module.backbone.hidden_states(inputs_for(module.backbone, batch=2), num_blocks=4))
        torch.testing.assert_close(module.adaptation.early_route(hidden), slow_early_route(module.adaptation, hidden),
                                   atol=1e-5, rtol=1e-5)


def test_gate_starts_closed_and_logits_follow_the_late_route():
    module = _module().eval()
    strategy, backbone = module.adaptation, module.backbone
    assert strategy.gamma.item() == 0.0
    x = inputs_for(backbone)
    with torch.no_grad():
        hidden = backbone.hidden_states(x, num_blocks=5)
        y = strategy.early_route(list(hidden))
        projected = [phi(h) for phi, h in zip(strategy.projections, hidden)]
        shallow = torch.stack(projected[:-1])
        z = aggregate(shallow, projected[-1], anti_redundancy_weights(shallow, projected[-1], strategy.score.weight[0],
                                                                       strategy.score.bias[0]))
        torch.testing.assert_close(y, strategy.out(z.relu()))  # no copy of h_K while gamma = 0
        expected = module.head(backbone.pool(backbone.finalize(backbone.blocks[5](y))))
        torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("late_blocks", [1, 2])
def test_gradients_and_activations_only_on_the_late_route(late_blocks):
    module = _module(late_blocks=late_blocks).train()
    counts = {i: 0 for i in range(6)}
    outputs: dict[int, Tensor] = {}

    def hooks(i: int):
        def pre(block, args):
            block._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: counts.__setitem__(i, counts[i] + 1) or t,
                                                                  lambda t: t)
            block._ctx.__enter__()

        def post(block, args, out):
            block._ctx.__exit__(None, None, None)
            outputs[i] = out
        return pre, post

    for i, block in enumerate(module.backbone.blocks):
        pre, post = hooks(i)
        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    x = inputs_for(module.backbone, batch=4)
    logits = module(x)
    first_late = 6 - late_blocks
    for i in range(6):
        if i < first_late:
            assert counts[i] == 0 and not outputs[i].requires_grad, f"early block {i} recorded activations"
        else:
            assert counts[i] > 0 and outputs[i].requires_grad, f"late block {i} must pass the gradient back"
    module.adaptation.loss(logits, (x, torch.arange(4) % 5)).backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    grads = {n: p.grad for n, p in module.adaptation.named_parameters()}
    missing = [n for n, g in grads.items() if g is None or (n != "gamma" and g.abs().sum() == 0)]
    assert not missing, f"strategy parameters without gradient: {missing}"
    assert module.head.fc.weight.grad.abs().sum() > 0


def test_saves_far_less_than_full_finetune():
    x = inputs_for(tiny_vit(), batch=4)
    sherl, full = _module().train(), TransferModule(tiny_vit(), FullFinetune(), num_classes=5).train()
    ratio = saved_bytes(lambda: sherl(x), exclude=sherl) / saved_bytes(lambda: full(x), exclude=full)
    assert ratio < 0.6, f"SHERL saved {ratio:.0%} of FullFinetune's activation bytes"


def test_tune_late_blocks_trains_and_checkpoints_them():
    module = _module(tune_late_blocks=True, late_blocks=2)
    trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.4.", "model.blocks.5.")) for n in trainable)
    kept, _ = module.checkpoint_format.split(module, module.state_dict())
    assert "backbone.model.blocks.5.mlp.fc1.weight" in kept and "backbone.model.blocks.3.mlp.fc1.weight" not in kept
    x = inputs_for(module.backbone)
    module.adaptation.loss(module(x), (x, torch.arange(4))).backward()
    assert module.backbone.model.blocks[4].attn.qkv.weight.grad is not None
    assert module.backbone.model.blocks[3].attn.qkv.weight.grad is None


def test_tuned_late_blocks_train_with_dropout_and_the_frozen_trunk_does_not():
    module = _module(tune_late_blocks=True, late_blocks=2).train()
    blocks = module.backbone.model.blocks
    assert all(m.training for i in (4, 5) for m in blocks[i].modules())  # dropout and drop-path stay on
    assert not any(m.training for i in range(4) for m in blocks[i].modules())
    assert not module.backbone.model.patch_embed.training
    assert module.adaptation.training
    module.eval()
    assert not any(m.training for m in module.modules())
    frozen = _module(late_blocks=2).train()  # not tuned: the late blocks are frozen and stay in eval mode
    assert not any(m.training for m in frozen.backbone.modules())


@pytest.mark.parametrize(("pooling", "late_blocks"), [("cls", 1), ("mean", 2)])
def test_bert_padded_batch_equals_each_example_alone(pooling, late_blocks):
    """Padded positions never reach a real one: the early route is per token, the late blocks and the pooling
    read the padding mask that ``hidden_states`` (``embed``) took from the batch."""
    module = TransferModule(tiny_bert(pooling=pooling), SHERL(late_blocks=late_blocks), num_classes=5).eval()
    with torch.no_grad():
        module.adaptation.gamma.fill_(0.05)  # open the gate so the copy of h_K matters too
        ids = token_inputs(module.backbone, batch=4)  # right padding of different lengths
        lengths = (ids != module.backbone.pad_token_id).sum(1)
        assert lengths.min() < ids.shape[1]
        batched = module(ids)
        for i in range(len(ids)):
            alone = module(ids[i:i + 1, : int(lengths[i])])  # the same example without padding
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)


def test_clear_errors_at_construction():
    with pytest.raises(ValueError, match=r"SHERL needs a token backbone.*LinearProbe"):
        TransferModule(tiny_cnn(), SHERL(), num_classes=5)
    with pytest.raises(ValueError, match="leaves no block for the early route"):
        _module(late_blocks=6)
    with pytest.raises(ValueError, match="shallow_layers"):
        _module(shallow_layers=[0, 5])
    with pytest.raises(ValueError, match="late_blocks must be >= 1"):
        SHERL(late_blocks=0)
    with pytest.raises(ValueError, match="projection must be"):
        SHERL(projection="mlp")  # type: ignore[arg-type]
