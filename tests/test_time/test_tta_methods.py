"""BNAdapt, Tent and CAFA: pre-update predictions, exact reset, episodic mode, the CAFA maths, composition."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_transfer import distributed
from lightning_transfer.module import TransferModule
from lightning_transfer.registry import STRATEGIES, TEST_TIME
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.test_time._norm import find_norm_layers
from lightning_transfer.test_time.bn_adapt import BNAdapt
from lightning_transfer.test_time.cafa import (
    CAFA,
    cafa_loss,
    class_statistics,
    mahalanobis_distances,
    precision_matrices,
)
from lightning_transfer.test_time.tent import Tent, softmax_entropy
from tests.helpers.models import tiny_cnn, tiny_vit

NUM_CLASSES = 5


class _Source:
    """A datamodule stand-in: a labelled training split for CAFA's statistics."""

    def __init__(self, n: int = 40, size: tuple[int, ...] = (3, 32, 32)) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, *size, generator=g)
        self.y = torch.arange(n) % NUM_CLASSES

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=20)


def _model(test_time, adaptation=None, backbone=None) -> TransferModule:
    torch.manual_seed(0)
    module = TransferModule(backbone or tiny_cnn(), adaptation or FullFinetune(), num_classes=NUM_CLASSES,
                            test_time=test_time)
    return module.eval()


def _batches(n: int = 3, size: tuple[int, ...] = (3, 32, 32)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    # shifted inputs: test statistics differ from the source running statistics
    return [(torch.randn(8, *size, generator=g) * 1.5 + 0.3, torch.arange(8) % NUM_CLASSES) for _ in range(n)]


def _params(method) -> list[torch.Tensor]:
    return [p.detach().clone() for p in method.params]


def _make(kind: str, **kw):
    return {"tent": Tent, "cafa": CAFA}[kind](**kw)


def _adapt(method, module, batch):
    with torch.enable_grad():
        return method.adapt(module, batch)


def test_registered_with_configs():
    assert {"bn_adapt", "tent", "cafa"} <= set(TEST_TIME.names())


@pytest.mark.parametrize("kind", ["tent", "cafa"])
def test_returns_pre_update_prediction_and_updates_only_norm_affine(kind):
    method = _make(kind)
    module = _model(method)
    method.prepare(module, _Source())
    others = {n: p.detach().clone() for n, p in module.named_parameters() if not n.startswith("test_time")}
    batch = _batches(1)[0]
    with torch.no_grad():
        expected = module(batch[0])  # BN already on test-batch statistics, parameters not yet updated
    logits = _adapt(method, module, batch)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        after = module(batch[0])
    assert not torch.allclose(after, expected, atol=1e-6)  # the update changed the model
    adapted = {id(p) for p in method.params}
    changed = [n for n, p in module.named_parameters()
               if not n.startswith("test_time") and not torch.equal(p, others[n])]
    assert changed and all(id(dict(module.named_parameters())[n]) in adapted for n in changed)
    bn_kinds = {type(m) for m in method.layers}
    assert bn_kinds and all(issubclass(t, distributed.BATCH_NORM_TYPES) for t in bn_kinds)


@pytest.mark.parametrize("kind", ["tent", "cafa"])
def test_reset_restores_parameters_and_optimizer_state_exactly(kind):
    method = _make(kind)
    module = _model(method)
    method.prepare(module, _Source())
    initial, initial_opt = _params(method), copy.deepcopy(method.optimizer.state_dict())
    batches = _batches(3)
    first = _adapt(method, module, batches[0])
    for b in batches[1:]:
        _adapt(method, module, b)
    assert method.optimizer.state_dict()["state"]  # Adam moments exist after steps
    method.reset()
    for p, q in zip(_params(method), initial):
        assert torch.equal(p, q)
    assert method.optimizer.state_dict() == initial_opt
    again = _adapt(method, module, batches[0])  # bit-identical replay from the restored state
    assert torch.equal(again, first)


@pytest.mark.parametrize("kind", ["tent", "cafa"])
def test_episodic_equals_each_batch_from_the_saved_state(kind):
    batches = _batches(3)
    episodic = _make(kind, episodic=True)
    module = _model(episodic)
    episodic.prepare(module, _Source())
    outs = [_adapt(episodic, module, b) for b in batches]
    params_after_last = _params(episodic)
    for i, b in enumerate(batches):
        fresh = _make(kind)
        single = _model(fresh)
        fresh.prepare(single, _Source())
        torch.testing.assert_close(outs[i], _adapt(fresh, single, b), atol=1e-6, rtol=0)
        if i == len(batches) - 1:
            for p, q in zip(params_after_last, _params(fresh)):
                torch.testing.assert_close(p, q, atol=1e-7, rtol=0)
    online = _make(kind)
    module2 = _model(online)
    online.prepare(module2, _Source())
    online_outs = [_adapt(online, module2, b) for b in batches]
    assert not torch.allclose(online_outs[-1], outs[-1], atol=1e-6)  # online mode carries the updates over


def test_bn_adapt_uses_batch_statistics_without_gradients_or_buffer_changes():
    method = BNAdapt()
    module = _model(method)
    buffers = {n: b.clone() for n, b in module.backbone.named_buffers()}
    params = {n: p.clone() for n, p in module.named_parameters()}
    method.prepare(module, None)
    x = _batches(1)[0][0]
    logits = method.adapt(module, (x,))
    assert not logits.requires_grad
    # reference: every BatchNorm normalises with the batch's own (biased) statistics
    ref = copy.deepcopy(module)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean, m.running_var = None, None
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(x), atol=1e-5, rtol=0)
    for n, b in module.backbone.named_buffers():
        assert torch.equal(b, buffers[n])
    assert all(torch.equal(p, params[n]) for n, p in module.named_parameters())
    module.eval()  # back in eval mode the source statistics are used again
    with torch.no_grad():
        assert not torch.allclose(module(x), logits, atol=1e-4)


def test_bn_adapt_on_a_vit_says_to_use_tent():
    with pytest.raises(ValueError, match="use Tent"):  # when the model is built, before any data or checkpoint
        _model(BNAdapt(), backbone=tiny_vit())


def test_tent_on_a_vit_adapts_layernorm():
    method = Tent()
    module = _model(method, backbone=tiny_vit())
    method.prepare(module, None)
    kind, layers = find_norm_layers(module, "auto")
    assert kind == "layer" and layers and all(isinstance(m, nn.LayerNorm) for m in method.layers)
    x = torch.randn(6, 1, 8, 8)
    before = _params(method)
    _adapt(method, module, (x,))
    assert any(not torch.equal(p, q) for p, q in zip(_params(method), before))


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="norm must be"):
        Tent(norm="instance")
    with pytest.raises(ValueError, match="optimizer must be"):
        Tent(optimizer="rmsprop")
    with pytest.raises(ValueError, match="covariance must be"):
        CAFA(covariance="diagonal")
    with pytest.raises(ValueError, match="ridge"):
        CAFA(ridge=-1.0)


def test_entropy_matches_reference():
    logits = torch.randn(6, 4) * 5
    p = torch.softmax(logits.double(), 1)
    ref = -(p * torch.log(p)).sum(1)
    torch.testing.assert_close(softmax_entropy(logits).double(), ref, atol=1e-5, rtol=0)


# ---- CAFA maths against slow references ----------------------------------------------------------------------------
def _slow_statistics(f, y, c, tied):
    means, covs = [], []
    for k in range(c):
        fk = f[y == k].double()
        mu = fk.mean(0)
        means.append(mu)
        covs.append(sum(torch.outer(v - mu, v - mu) for v in fk) / len(fk))
    if tied:
        counts = torch.tensor([(y == k).sum() for k in range(c)]).double()
        return torch.stack(means), (sum(n * s for n, s in zip(counts, covs)) / counts.sum())[None]
    return torch.stack(means), torch.stack(covs)


def _slow_cafa(f, logits, means, covs, ridge):
    total = 0.0
    for i in range(len(f)):
        d = []
        for k in range(len(means)):
            cov = covs[0] if len(covs) == 1 else covs[k]
            inv = torch.linalg.inv(cov.double() + ridge * torch.eye(cov.shape[0], dtype=torch.float64))
            diff = f[i].double() - means[k].double()
            d.append(diff @ inv @ diff)
        pred = int(logits[i].argmax())
        total += torch.log(d[pred] / sum(d))
    return total / len(f)


@pytest.mark.parametrize("tied", [False, True])
def test_cafa_statistics_and_loss_against_slow_reference(tied):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(60, 6, generator=g)
    y = torch.arange(60) % 4
    means, covs, counts = class_statistics(f, y, 4, tied=tied)
    ref_means, ref_covs = _slow_statistics(f, y, 4, tied)
    torch.testing.assert_close(means, ref_means, atol=1e-10, rtol=0)
    torch.testing.assert_close(covs, ref_covs, atol=1e-10, rtol=0)
    assert counts.tolist() == [15, 15, 15, 15]
    test_f, logits = torch.randn(9, 6, generator=g), torch.randn(9, 4, generator=g)
    loss = cafa_loss(test_f, logits, means.float(), precision_matrices(covs, 1e-3))
    ref = _slow_cafa(test_f, logits, means, covs, 1e-3)
    assert loss.item() == pytest.approx(float(ref), abs=1e-4)
    assert loss.item() <= 0  # a ratio in (0, 1]


def test_cafa_gradient_pulls_features_towards_the_predicted_class():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    precisions = torch.eye(2)[None]
    f = torch.tensor([[1.0, 0.5]], requires_grad=True)
    logits = torch.tensor([[3.0, 0.0, 0.0]])  # predicted class 0
    cafa_loss(f, logits, means, precisions).backward()
    before = mahalanobis_distances(f.detach(), means, precisions)
    after = mahalanobis_distances(f.detach() - 0.05 * f.grad, means, precisions)
    assert after[0, 0] < before[0, 0]  # closer to its own class
    assert (after[0, 0] / after.sum()) < (before[0, 0] / before.sum())


def test_cafa_singular_covariance_stays_finite_thanks_to_the_ridge():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(15, 32, generator=g)  # 3 samples per class, 32 dimensions: rank <= 2 per class
    y = torch.arange(15) % 5
    means, covs, _ = class_statistics(f, y, 5)
    assert torch.linalg.matrix_rank(covs[0]).item() < 32
    with pytest.raises(torch.linalg.LinAlgError):
        precision_matrices(covs, 0.0)
    test_f = torch.randn(8, 32, generator=g, requires_grad=True)
    loss = cafa_loss(test_f, torch.randn(8, 5, generator=g), means.float(), precision_matrices(covs, 1e-5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(test_f.grad).all()


def test_cafa_prepare_computes_source_statistics_of_head_features():
    method = CAFA()
    module = _model(method)
    source = _Source()
    method.prepare(module, source)
    with torch.no_grad():
        feats = module.backbone.eval()(source.x)  # source model: running statistics
    means, covs, _ = class_statistics(feats, source.y, NUM_CLASSES)
    torch.testing.assert_close(method.class_means, means.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(method.class_covariances, covs.float(), atol=1e-5, rtol=1e-4)
    assert method.class_covariances.shape == (NUM_CLASSES, module.backbone.num_features, module.backbone.num_features)


def test_cafa_without_source_data_or_statistics_says_what_to_do():
    method = CAFA()
    with pytest.raises(ValueError, match="statistics_path"):
        method.prepare(_model(method), None)


def test_cafa_statistics_path_is_written_then_read_without_source(tmp_path):
    path = str(tmp_path / "stats.safetensors")
    first = CAFA(covariance="tied", statistics_path=path)
    first.prepare(_model(first), _Source())
    second = CAFA(covariance="tied", statistics_path=path)
    second.prepare(_model(second), None)  # no source data needed any more
    assert second.class_covariances.shape[0] == 1
    torch.testing.assert_close(second.class_covariances, first.class_covariances, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["tent", "cafa", "bn_adapt"])
def test_release_hands_the_model_back_as_prepare_found_it(kind):
    method = BNAdapt() if kind == "bn_adapt" else _make(kind)
    module = _model(method)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    method.prepare(module, _Source())
    for batch in _batches(2):
        _adapt(method, module, batch)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.track_running_stats for m in norms)
    method.release(module)
    assert all(m.track_running_stats for m in norms)  # a later fit updates the running statistics again
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_check_refuses_a_method_the_model_cannot_take_without_touching_it():
    module = _model(None, backbone=tiny_vit())
    with pytest.raises(ValueError, match="use Tent"):
        BNAdapt().check(module)
    with pytest.raises(ValueError, match="no group-norm layers"):
        Tent(norm="group").check(module)
    Tent().check(module)  # LayerNorm on a ViT: fine
    assert all(p.requires_grad for p in module.head.parameters())  # check() changed nothing


@pytest.mark.parametrize("method", [BNAdapt, Tent, CAFA])
def test_batch_norm_methods_refuse_one_image_test_batches(method):
    instance = method()
    module = _model(instance)
    source = _Source()
    source.batch_size = 1
    with pytest.raises(ValueError, match=r"data.init_args.batch_size=1"):
        instance.prepare(module, source)
    source.batch_size = 8
    with pytest.warns(UserWarning, match="test batches of 8 images"):
        method().prepare(_model(instance), source)


def test_layer_norm_methods_take_one_image_test_batches():
    source = _Source(size=(1, 8, 8))
    source.batch_size = 1
    method = Tent()
    method.prepare(_model(method, backbone=tiny_vit()), source)  # LayerNorm normalises each image on its own
    assert method.layers


def test_cafa_statistics_of_another_model_are_refused_by_name(tmp_path):
    path = str(tmp_path / "stats.safetensors")
    first = CAFA(statistics_path=path)
    first.prepare(_model(first), _Source())
    other = CAFA(statistics_path=path)
    torch.manual_seed(0)
    module = TransferModule(tiny_cnn(), FullFinetune(), num_classes=NUM_CLASSES + 2, test_time=other).eval()
    with pytest.raises(ValueError, match=rf"means of {NUM_CLASSES} classes .* this model has {NUM_CLASSES + 2} "
                                         "classes.*delete the file"):
        other.prepare(module, None)
    tied = CAFA(covariance="tied", statistics_path=path)  # per-class covariances where one pooled one is asked for
    with pytest.raises(ValueError, match="covariance='tied'"):
        tied.prepare(_model(tied), None)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    junk = CAFA(statistics_path=str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="junk.safetensors' cannot be read.*delete it"):
        junk.prepare(_model(junk), None)


def test_cafa_on_a_datamodule_without_training_split_says_what_to_do():
    class NoTrain:
        batch_size = 32

        def train_dataloader(self):
            raise RuntimeError("NpzImages has no 'train' split (call setup first)")

        def setup(self, stage):
            pass

    method = CAFA()
    with pytest.raises(ValueError, match="NoTrain has no training split.*statistics_path="):
        method.prepare(_model(method), NoTrain())


# ---- composition with trained models of every kind ------------------------------------------------------------
def _compositions():
    cases = [("full", {}, "cnn"), ("linear_probe", {}, "cnn"), ("partial_freeze", {"num_frozen_blocks": 2}, "cnn")]
    if "lora" in STRATEGIES:
        cases.append(("lora", {"r": 4}, "vit"))
    return cases


def _adapted_once(kind, adaptation, backbone):
    method = _make(kind)
    factory = {"cnn": tiny_cnn, "vit": tiny_vit}[backbone]
    module = _model(method, adaptation=adaptation, backbone=factory())
    size = (3, 32, 32) if backbone == "cnn" else (1, 8, 8)
    method.prepare(module, _Source(size=size))
    batch = _batches(1, size)[0]
    with torch.no_grad():
        expected = module(batch[0])
    before = _params(method)
    logits = _adapt(method, module, batch)
    moved = [not torch.equal(p, q) for p, q in zip(_params(method), before)]
    return logits, expected, moved


@pytest.mark.parametrize("kind", ["tent", "cafa"])
@pytest.mark.parametrize(("strategy", "init_args", "backbone"), _compositions())
def test_composes_with_any_training_strategy(kind, strategy, init_args, backbone):
    logits, expected, moved = _adapted_once(kind, STRATEGIES.get(strategy)(**init_args), backbone)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # the same normalisation parameters move as when the whole model is differentiable (FullFinetune), even where
    # the strategy computes frozen features without autograd (LinearProbe, PartialFreeze). (Some stay put in the
    # tiny ResNet: zero-initialised last-BN gammas cut the gradient to the layers before them.)
    _, _, moved_full = _adapted_once(kind, FullFinetune(), backbone)
    assert any(moved) and moved == moved_full
