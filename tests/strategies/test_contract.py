"""The strategy contract suite: every registered strategy passes the same checks (STYLE.md, DESIGN.md).

Cases come from ``tests/strategies/cases_*.py``; a registered strategy without cases or without
``configs/strategy/<name>.yaml`` fails the meta-test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transfer.cli import TransferCLI
from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.registry import STRATEGIES
from tests.conftest import REPO
from tests.helpers.models import BACKBONE_FACTORIES, inputs_for


def _load_cases() -> dict[str, list[dict]]:
    cases: dict[str, list[dict]] = {}
    for path in sorted(Path(__file__).parent.glob("cases_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, items in module.CASES.items():
            cases.setdefault(name, []).extend(items)
        # a cases file may bring backbone factories of its own (e.g. a tiny BERT or CLIP)
        BACKBONE_FACTORIES.update(getattr(module, "FACTORIES", {}))
        CLI_BACKBONES.update(getattr(module, "CLI_BACKBONES", {}))
    return cases


CLI_BACKBONES: dict = {}  # backbone kind -> callable returning the CLI args that select that backbone
CASES = _load_cases()
CLASS_NAMES = ["5", "6", "7", "8", "9"]  # the Digits target task's classes


def _params():
    out = []
    for name, items in sorted(CASES.items()):
        cls = STRATEGIES.get(name)
        for i, case in enumerate(items):
            kinds = case.get("backbones") or (["vit"] if cls.needs_tokens else ["vit", "cnn"])
            for kind in kinds:
                out.append(pytest.param(name, case, kind, id=f"{name}-{i}-{kind}"))
    return out


def _build(name: str, case: dict, kind: str, num_classes: int = 5) -> TransferModule:
    backbone = BACKBONE_FACTORIES[kind]()
    strategy = STRATEGIES.get(name)(**case["init_args"])
    return TransferModule(backbone, strategy, num_classes=num_classes, class_names=CLASS_NAMES[:num_classes])


def _digits(module: TransferModule) -> Digits:
    dm = Digits(task="target", num_shots=2, batch_size=5)
    dm.set_data_config(module.backbone.data_config())
    return dm


def _trainer(**kw) -> Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1)
    return Trainer(**{**defaults, **kw})


# ---- meta ------------------------------------------------------------------------------------------------
def test_every_registered_strategy_has_cases_and_yaml():
    assert len(STRATEGIES) >= 3
    for name in STRATEGIES.names():
        assert name in CASES, f"strategy {name!r} has no contract cases: add them to tests/strategies/cases_*.py"
        assert (REPO / "configs" / "strategy" / f"{name}.yaml").is_file(), f"configs/strategy/{name}.yaml missing"
    for path in (REPO / "configs" / "strategy").glob("*.yaml"):
        assert path.stem in STRATEGIES, f"{path} names no registered strategy"


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_from_its_yaml(name):
    cls = STRATEGIES.get(name)
    kind = (CASES[name][0].get("backbones") or ["vit"])[0]
    digits_vit = ["--config", str(REPO / "configs/backbone/digits_vit.yaml")]
    backbone = CLI_BACKBONES[kind]() if kind in CLI_BACKBONES else digits_vit
    configs = ["configs/data/digits_target.yaml", f"configs/strategy/{name}.yaml"]
    args = [*backbone, *(item for path in configs for item in ("--config", str(REPO / path)))]
    cli = TransferCLI(args=[*args, "--trainer.logger=false"], run=False)
    assert type(cli.model.adaptation) is cls
    assert cli.model.num_classes == 5 and cli.model.class_names == ["5", "6", "7", "8", "9"]


# ---- behaviour ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "case", "kind"), _params())
def test_freezes_what_it_claims(name, case, kind):
    pretrained_names = {n for n, _ in BACKBONE_FACTORIES[kind]().named_parameters()}
    module = _build(name, case, kind)
    cls = type(module.adaptation)
    backbone_trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad and n in pretrained_names}
    if cls.trains_backbone:
        assert backbone_trainable, f"{name} claims trains_backbone but freezes every pretrained weight"
    else:
        assert not backbone_trainable, f"{name} leaves pretrained weights trainable: {sorted(backbone_trainable)[:5]}"
    if cls.trains_nothing:
        assert module.parameter_counts()["trainable"] == 0
    else:
        assert module.parameter_counts()["trainable"] > 0


@pytest.mark.parametrize(("name", "case", "kind"), _params())
def test_one_step_changes_only_trainable_parameters(name, case, kind):
    module = _build(name, case, kind)
    if module.adaptation.trains_nothing:
        with pytest.raises(ValueError, match="nothing to fit"):
            module.configure_optimizers()
        return
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    module.train()
    x = inputs_for(module.backbone, batch=6)
    loss = module.adaptation.loss(module(x), (x, torch.arange(6) % 5))
    loss.backward()
    for n, p in module.named_parameters():
        if n in frozen:
            assert p.grad is None, f"frozen parameter {n} received a gradient"
    optimizer.step()
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "one optimizer step changed nothing"
    assert not changed & frozen, f"frozen parameters changed: {sorted(changed & frozen)[:5]}"
    if not type(module.adaptation).trains_backbone:  # a frozen backbone stays in eval mode: BN statistics fixed
        moved = [k for k in changed if k.startswith("backbone.") and k.replace("backbone.", "", 1) in
                 dict(module.backbone.named_buffers())]
        assert not moved, f"frozen backbone buffers changed: {moved[:5]}"


@pytest.mark.parametrize(("name", "case", "kind"), _params())
def test_identity_at_init(name, case, kind):
    if not STRATEGIES.get(name).identity_at_init:
        pytest.skip(f"{name} does not claim identity at init")
    module = _build(name, case, kind).eval()
    reference = BACKBONE_FACTORIES[kind]().eval()
    x = inputs_for(module.backbone)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.head(reference(x)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("name", "case", "kind"), _params())
def test_checkpoint_round_trip_is_strict_and_small(name, case, kind, tmp_path):
    module = _build(name, case, kind)
    dm = _digits(module)
    if module.adaptation.trains_nothing:
        trainer = _trainer(limit_val_batches=1)
        trainer.validate(module, datamodule=dm, verbose=False)
    else:
        trainer = _trainer(max_steps=2, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    frozen = {f"backbone.{n}" for n, p in module.backbone.named_parameters() if not p.requires_grad}
    assert not frozen & set(saved["state_dict"]), "checkpoint holds frozen pretrained weights"
    loaded = TransferModule.load_from_checkpoint(path, weights_only=True)
    assert type(loaded.adaptation) is type(module.adaptation)
    for key, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = inputs_for(module.backbone)
    with torch.no_grad():
        assert torch.equal(module.eval()(x), loaded.eval()(x))


@pytest.mark.parametrize(("name", "case", "kind"), _params())
def test_fast_dev_run(name, case, kind):
    module = _build(name, case, kind)
    trainer = _trainer(fast_dev_run=True)
    trains_nothing = module.adaptation.trains_nothing
    (trainer.validate if trains_nothing else trainer.fit)(module, datamodule=_digits(module))
    assert trainer.state.finished
    assert torch.isfinite(trainer.callback_metrics["val/loss" if trains_nothing else "train/loss"])
