"""The test-time contract: every registered test-time method, built from its YAML in configs/test_time/, runs
through the same checks. Adding a method needs its file (registered) and its YAML, nothing here.

- it refuses, with a message naming the fix, a model that lacks what it declares in ``requires``;
- on every backbone it claims (BatchNorm CNN; LayerNorm ViT unless it requires BatchNorm) it tests inside
  ``trainer.test`` and returns one prediction per image;
- ``reset()`` restores every parameter and buffer exactly, and episodic mode gives each batch the prediction a
  fresh model gives it;
- after testing the model is handed back exactly as it was (weights, buffers, ``requires_grad``, train/eval mode,
  BatchNorm tracking);
- a checkpoint saved after testing reloads its state strictly into a fresh method of the same class.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import distributed
from lightning_transfer.module import TransferModule
from lightning_transfer.registry import TEST_TIME
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.test_time.base import TestTimeAdaptation
from tests.helpers.models import BACKBONE_FACTORIES
from tests.helpers.tta_methods import CASES, method_from_yaml

NUM_CLASSES = 5
NORM_TYPES = (*distributed.BATCH_NORM_TYPES, nn.LayerNorm, nn.GroupNorm)


def _images(kind: str, n: int, seed: int, shift: float = 0.0) -> TensorDataset:
    size = (3, 32, 32) if kind == "cnn" else (1, 8, 8)
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *size, generator=g) * (1 + shift) + shift, torch.arange(n) % NUM_CLASSES)


class _Data(LightningDataModule):
    """A labelled source split (for methods that require source data) and shifted test sets."""

    batch_size = 16

    def __init__(self, kind: str, test_sets: int = 1, source: bool = True) -> None:
        super().__init__()
        self.kind, self.test_sets, self.source = kind, test_sets, source

    def train_dataloader(self):
        if not self.source:
            raise RuntimeError("this datamodule has no training split")
        return DataLoader(_images(self.kind, 40, 0), batch_size=self.batch_size)

    def test_dataloader(self):
        loaders = [DataLoader(_images(self.kind, 32, 10 + i, shift=0.5), batch_size=self.batch_size)
                   for i in range(self.test_sets)]
        return loaders if len(loaders) > 1 else loaders[0]


def _model(method: TestTimeAdaptation | None, kind: str) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule(BACKBONE_FACTORIES[kind](), FullFinetune(), num_classes=NUM_CLASSES, test_time=method)


def _trainer(**kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, inference_mode=False, **kw)


def _snapshot(module: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("test_time.")},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "training": {n: m.training for n, m in module.named_modules()
                     if n.startswith(("backbone", "adaptation", "head"))},
        "tracking": {n: m.track_running_stats for n, m in module.named_modules()
                     if isinstance(m, distributed.BATCH_NORM_TYPES)},
    }


def _assert_same(after: dict, before: dict) -> None:
    assert set(after["state"]) == set(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for what in ("requires_grad", "training", "tracking"):
        assert after[what] == before[what], what


def _adapt(method: TestTimeAdaptation, module: TransferModule, batch) -> torch.Tensor:
    with torch.enable_grad():
        return method.adapt(module, batch).detach()


def _prepared(name: str, kind: str, **overrides) -> tuple[TestTimeAdaptation, TransferModule, list]:
    method = method_from_yaml(name, **overrides)
    module = _model(method, kind).eval()
    data = _Data(kind)
    method.prepare(module, data)
    return method, module, list(data.test_dataloader())


# ---- the registry and the YAML -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEST_TIME.names())
def test_every_method_has_a_yaml_that_builds_it_and_declares_known_requirements(name):
    method = method_from_yaml(name)
    assert type(method) is TEST_TIME.get(name)
    assert type(method).requires <= {"batch_norm", "norm_layers", "linear_head", "source_data"}
    assert (type(method).__doc__ or "").strip(), "a registered method documents what it computes"


# ---- what it refuses ---------------------------------------------------------------------------------------
def _without_norm_layers(module: TransferModule) -> TransferModule:
    for parent in list(module.backbone.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, NORM_TYPES):
                setattr(parent, child_name, nn.Identity())
    return module


REFUSALS = {
    # requirement -> how to build a model without it
    "batch_norm": lambda method: _model(None, "vit"),
    "norm_layers": lambda method: _without_norm_layers(_model(None, "vit")),
    "linear_head": lambda method: _headless(_model(None, "cnn")),
}


def _headless(module: TransferModule) -> TransferModule:
    module.head = None  # as a CLIP prompt strategy builds its classifier from class names
    return module


@pytest.mark.parametrize(("name", "requirement"), [(n, r) for n in TEST_TIME.names()
                                                   for r in sorted(TEST_TIME.get(n).requires) if r in REFUSALS])
def test_a_model_without_what_the_method_requires_is_refused_before_it_is_touched(name, requirement):
    method = method_from_yaml(name)
    module = REFUSALS[requirement](method)
    before = _snapshot(module)
    with pytest.raises(ValueError) as refusal:
        method.check(module)
    message = str(refusal.value)
    assert "\n" not in message.strip() and (":" in message or "use " in message), message  # says what to do
    _assert_same(_snapshot(module), before)


@pytest.mark.parametrize("name", [n for n in TEST_TIME.names() if "source_data" in TEST_TIME.get(n).requires])
def test_a_method_that_needs_source_data_says_so_without_it(name):
    method = method_from_yaml(name)
    module = _model(method, "cnn").eval()
    with pytest.raises(ValueError, match="training split|source"):
        method.prepare(module, None)
    with pytest.raises(ValueError, match="training split|source"):
        method.prepare(module, _Data("cnn", source=False))


# ---- on every backbone it claims ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kind"), CASES)
def test_it_tests_inside_the_trainer_and_hands_the_model_back_unchanged(name, kind):
    method = method_from_yaml(name)
    module = _model(method, kind)
    before = _snapshot(module)
    result = _trainer().test(module, datamodule=_Data(kind, test_sets=2), verbose=False)
    assert len(result) == 2 and all(0.0 <= r[f"test/acc/dataloader_idx_{i}"] <= 1.0 for i, r in enumerate(result))
    _assert_same(_snapshot(module), before)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_predictions_are_one_row_per_image_made_before_the_update(name, kind):
    method, module, batches = _prepared(name, kind)
    logits = _adapt(method, module, batches[0])
    assert logits.shape == (len(batches[0][0]), NUM_CLASSES) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_reset_restores_every_parameter_and_buffer_exactly(name, kind):
    method, module, batches = _prepared(name, kind)
    prepared = {k: v.detach().clone() for k, v in module.state_dict().items()}
    first = _adapt(method, module, batches[0])
    _adapt(method, module, batches[1])
    method.reset()
    for key, value in prepared.items():
        assert torch.equal(module.state_dict()[key], value), key
    assert torch.equal(_adapt(method, module, batches[0]), first)  # replayed bit for bit from the restored state


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_episodic_mode_gives_each_batch_what_a_fresh_model_gives_it(name, kind):
    method, module, batches = _prepared(name, kind, episodic=True)
    outputs = [_adapt(method, module, b) for b in batches]
    for batch, output in zip(batches, outputs):
        fresh, fresh_module, _ = _prepared(name, kind)
        torch.testing.assert_close(output, _adapt(fresh, fresh_module, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_a_checkpoint_saved_after_testing_reloads_its_state_strictly(name, kind, tmp_path):
    method = method_from_yaml(name)
    module = _model(method, kind)
    trainer = _trainer()
    trainer.test(module, datamodule=_Data(kind), verbose=False)
    path = tmp_path / "tested.ckpt"
    trainer.save_checkpoint(path)
    loaded = TransferModule.load_from_checkpoint(path, weights_only=True, test_time=method_from_yaml(name))
    assert type(loaded.test_time) is type(method)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    result = _trainer().test(loaded, datamodule=_Data(kind), verbose=False)[0]  # and it tests from there
    assert 0.0 <= result["test/acc"] <= 1.0
