"""ZeroShotCLIP, CoOp and CoCoOp on a tiny random CLIP: prompt assembly, what trains, checkpoints, protocols."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transfer.base_to_new import evaluate_base_to_new, evaluate_on, harmonic_mean, with_class_names
from lightning_transfer.datamodules import Digits
from lightning_transfer.datamodules.class_subset import ClassSubset, base_new_split
from lightning_transfer.module import TransferModule
from lightning_transfer.prompts import assemble_prompts, resolve_templates
from lightning_transfer.strategies.cocoop import CoCoOp
from lightning_transfer.strategies.coop import CoOp
from lightning_transfer.strategies.zeroshot_clip import ZeroShotCLIP, ensemble_text_features
from tests.helpers.models import tiny_vit
from tests.helpers.tiny_clip import tiny_clip

NAMES = ["5", "6", "7", "8", "9"]


def _module(strategy, names=NAMES) -> TransferModule:
    return TransferModule(tiny_clip(), strategy, num_classes=len(names), class_names=names)


def _digits(module: TransferModule, **kw) -> Digits:
    dm = Digits(**{"task": "target", "num_shots": 2, "batch_size": 5, **kw})
    dm.set_data_config(module.backbone.data_config())
    return dm


def _trainer(**kw) -> Trainer:
    return Trainer(**{"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                      "enable_model_summary": False, "accelerator": "cpu", "devices": 1, **kw})


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(3))


# ---- prompt assembly ------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_prompt_assembly_matches_the_tokenised_sentence(position, class_specific):
    """With the context set to the embeddings of real words, each prompt must equal the embedded sentence."""
    ctx_words = ["photo", "of", "the", "cat"]  # one token each in the tiny vocabulary
    names = ["dog", "5", "itap bird", "handwritten digit"]  # one to several tokens
    coop = CoOp(n_ctx=4, class_specific=class_specific, class_token_position=position)
    module = _module(coop, names)
    clip = module.backbone
    words = torch.tensor([clip.token_ids(w)[0] for w in ctx_words])
    with torch.no_grad():
        word_emb = clip.token_embedding(words)  # (4, D)
        coop.ctx.copy_(word_emb.expand(len(names), -1, -1) if class_specific else word_emb)
    prompts, eot = coop.prompts(clip)
    for c, name in enumerate(names):
        ctx = ctx_words
        sentence = {"end": [*ctx, name], "middle": [*ctx[:2], name, *ctx[2:]], "front": [name, *ctx]}[position]
        ids = clip.tokenize([" ".join(sentence) + "."])
        with torch.no_grad():
            reference = clip.token_embedding(ids)[0]
        torch.testing.assert_close(prompts[c], reference, atol=0, rtol=0)
        assert eot[c] == (ids[0] == clip.eos_token_id).nonzero()[0, 0]


def test_assemble_prompts_against_slow_reference():
    c, m, s, d = 3, 4, 7, 5
    prefix, ctx, suffix = torch.randn(c, 1, d), torch.randn(c, m, d), torch.randn(c, s, d)
    name_lens = [1, 3, 2]
    for position in ("end", "middle", "front"):
        out = assemble_prompts(prefix, ctx, suffix, name_lens, position)
        for k in range(c):
            rows = [prefix[k, 0]]
            ctx_rows, name_rows, rest = list(ctx[k]), list(suffix[k, :name_lens[k]]), list(suffix[k, name_lens[k]:])
            if position == "end":
                rows += ctx_rows + name_rows + rest
            elif position == "middle":
                rows += ctx_rows[: m // 2] + name_rows + ctx_rows[m // 2:] + rest
            else:
                rows += name_rows + ctx_rows + rest
            assert torch.equal(out[k], torch.stack(rows))
    with pytest.raises(ValueError, match="class_token_position"):
        assemble_prompts(prefix, ctx, suffix, name_lens, "back")  # type: ignore[arg-type]


# ---- what trains ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [lambda: CoOp(n_ctx=4), lambda: CoCoOp(meta_hidden=8)],
                         ids=["coop", "cocoop"])
def test_only_the_prompt_learner_trains_and_clip_stays_bit_identical(strategy):
    module = _module(strategy())
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    module.train()
    assert not module.backbone.training and not any(m.training for m in module.backbone.modules())
    optimizer = torch.optim.SGD(module.adaptation.param_groups(module.backbone, None), lr=1.0)
    loss = module.adaptation.loss(module(_images(6)), (None, torch.arange(6) % 5))
    loss.backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, _ in module.adaptation.named_parameters(prefix="adaptation")}
    assert grads == expected and "adaptation.ctx" in grads
    if isinstance(module.adaptation, CoCoOp):
        assert any("meta_net" in n for n in grads)
    ctx_before = module.adaptation.ctx.detach().clone()
    optimizer.step()
    assert not torch.equal(module.adaptation.ctx, ctx_before)
    for k, v in module.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_text_features_once_per_step_and_logit_scale_is_clips(monkeypatch):
    module = _module(CoOp(n_ctx=4))
    clip = module.backbone
    calls = []
    original = clip.encode_text_embeddings
    monkeypatch.setattr(clip, "encode_text_embeddings", lambda e, i: calls.append(e.shape) or original(e, i))
    x = _images(6)
    logits = module(x)
    assert calls == [torch.Size([5, clip.context_length, clip.text_width])]  # all classes at once, not per image
    with torch.no_grad():
        img = clip.encode_image(x)
        txt = original(*module.adaptation.prompts(clip))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(logits, clip.model.logit_scale.exp() * img @ txt.t())


def test_context_initialisation():
    module = _module(CoOp(n_ctx=4, ctx_init="a photo of a"))
    clip = module.backbone
    with torch.no_grad():
        expected = clip.token_embedding(torch.tensor(clip.token_ids("a photo of a")))
    assert torch.equal(module.adaptation.ctx, expected)
    random = _module(CoOp(n_ctx=16)).adaptation.ctx
    assert random.shape == (16, clip.text_width) and 0.015 < random.std().item() < 0.025
    assert _module(CoOp(n_ctx=2, class_specific=True)).adaptation.ctx.shape == (5, 2, clip.text_width)
    with pytest.raises(ValueError, match="set n_ctx: 4"):
        _module(CoOp(n_ctx=16, ctx_init="a photo of a"))


# ---- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [lambda: CoOp(n_ctx=4), lambda: CoCoOp(meta_hidden=8)],
                         ids=["coop", "cocoop"])
def test_checkpoint_holds_only_the_prompt_learner(strategy, tmp_path):
    module = _module(strategy())
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_digits(module))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert set(saved) == {n for n, _ in module.adaptation.named_parameters(prefix="adaptation")}
    loaded = TransferModule.load_from_checkpoint(path, weights_only=True)
    x = _images()
    with torch.no_grad():
        assert torch.equal(module.eval()(x), loaded.eval()(x))


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_export_of_a_prompt_learner_points_to_the_checkpoint(fmt, tmp_path):
    import lightning

    from lightning_transfer.export import export_checkpoint

    module = _module(CoOp(n_ctx=4))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "coop.ckpt")
    with pytest.raises(ValueError, match=r"CoOp keeps trained weights outside the backbone \(ctx\).*Use the "
                                         "checkpoint itself") as refused:
        export_checkpoint(str(tmp_path / "coop.ckpt"), fmt, str(tmp_path / "out"))
    assert "--format merged" not in str(refused.value)  # merged refuses too


def test_zero_shot_validates_without_fit_and_survives_save_and_reload(tmp_path):
    module = _module(ZeroShotCLIP("ensemble:digits"))
    dm = _digits(module, batch_size=64)
    trainer = _trainer(limit_test_batches=2)
    first = trainer.validate(module, datamodule=dm, verbose=False)[0]
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert 0.0 <= first["val/acc"] <= 1.0 and "test/acc" in tested
    path = tmp_path / "zs.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["state_dict"] == {}
    loaded = TransferModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.adaptation.templates == module.adaptation.templates
    again = _trainer().validate(loaded, datamodule=dm, verbose=False)[0]
    assert again["val/acc"] == first["val/acc"] and again["val/loss"] == pytest.approx(first["val/loss"], abs=1e-6)
    with pytest.raises(ValueError, match="nothing to fit"):
        _trainer(max_steps=1).fit(module, datamodule=dm)


def test_zero_shot_text_features_are_cached_and_ensembled(monkeypatch):
    module = _module(ZeroShotCLIP(["a photo of a {}.", "itap of a {}."]))
    clip = module.backbone
    calls = []
    original = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda ids: calls.append(ids.shape) or original(ids))
    module(_images())
    module(_images())
    assert calls == [torch.Size([10, clip.context_length])]  # 2 templates x 5 classes, once
    with torch.no_grad():
        per_template = torch.stack([original(clip.tokenize([t.format(n) for n in NAMES]))
                                    for t in ["a photo of a {}.", "itap of a {}."]])
    ref = sum(f / f.norm(dim=-1, keepdim=True) for f in per_template) / 2
    torch.testing.assert_close(module.adaptation.text_features(clip), ref / ref.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(ensemble_text_features(per_template), ref / ref.norm(dim=-1, keepdim=True))


def test_templates():
    assert resolve_templates("oxford_pets") == ["a photo of a {}, a type of pet."]
    assert resolve_templates("dtd") == ["{} texture."]
    assert len(resolve_templates("ensemble:eurosat")) == 8
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates("a photo")


# ---- class names: errors, cross-dataset, base-to-new ----------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match="class names, but the model has none"):
        TransferModule(tiny_clip(), CoOp(n_ctx=4), num_classes=5)
    with pytest.raises(ValueError, match="HFCLIPBackbone"):
        TransferModule(tiny_vit(), ZeroShotCLIP(), num_classes=5, class_names=NAMES)
    for strategy in (CoOp, CoCoOp):
        with pytest.raises(ValueError, match=r"init_std must be > 0 \(0.02 in the paper\), got -1.0"):
            strategy(init_std=-1.0)


@pytest.mark.parametrize("make", [lambda names: _module(CoOp(n_ctx=40), names),
                                  lambda names: _module(CoOp(n_ctx=2), [*names, "x" * 40]),
                                  lambda names: _module(ZeroShotCLIP(), [*names, "x" * 40]),
                                  lambda names: with_class_names(_module(CoOp(n_ctx=2), names), ["a", "x" * 40])])
def test_a_prompt_longer_than_the_text_context_fails_at_construction(make):
    with pytest.raises(ValueError, match="longer than the text tower's context of 32: shorten"):
        make(NAMES)  # not at the first forward


def test_class_specific_context_refuses_another_class_list(tmp_path):
    module = _module(CoOp(n_ctx=2, class_specific=True))
    with pytest.raises(ValueError, match="class-specific contexts are tied"):
        module.adaptation.set_class_names(["a", "b", "c"])
    with pytest.raises(ValueError, match="class-specific contexts are tied"):
        with_class_names(module, ["a", "b", "c"])
    module.adaptation.set_class_names(["x", "y", "z", "u", "v"])  # same size: allowed (a relabelling)


def test_class_specific_checkpoint_on_another_class_count_says_why(tmp_path):
    module = _module(CoOp(n_ctx=2, class_specific=True))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    three = _module(CoOp(n_ctx=2, class_specific=True), ["a", "b", "c"])  # what `test` on other data builds
    with pytest.raises(ValueError, match=r"one context per class for 5 classes, so it cannot classify 3 classes.*"
                                         "class-specific contexts are tied .* train with class_specific=false"):
        three.on_load_checkpoint(checkpoint)


def test_cross_dataset_rebuilds_the_class_name_tokens():
    module = _module(CoOp(n_ctx=4))
    other = Digits(task="source", source_classes=[0, 1, 2], num_shots=2, batch_size=64)
    other.set_data_config(module.backbone.data_config())
    target = with_class_names(module, other.class_names)
    assert target.num_classes == 3 and target.adaptation.class_names == ["0", "1", "2"]
    assert torch.equal(target.adaptation.ctx, module.adaptation.ctx)  # the trained prompt is kept
    assert module.adaptation.class_names == NAMES  # the original is untouched
    assert target(_images()).shape == (4, 3)
    metrics = evaluate_on(module, other, _trainer(limit_test_batches=1))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    with pytest.raises(ValueError, match="linear head"):
        with_class_names(TransferModule(tiny_vit(), num_classes=5), ["a", "b"])


def test_base_to_new_split_and_harmonic_mean():
    assert base_new_split(5) == ([0, 1, 2], [3, 4]) and base_new_split(10) == (list(range(5)), list(range(5, 10)))
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4) and harmonic_mean(0, 0) == 0
    module = _module(CoOp(n_ctx=4), NAMES[:3])
    data = Digits(task="target", num_shots=2, batch_size=64)
    data.set_data_config(module.backbone.data_config())
    base, new = ClassSubset(data, "base"), ClassSubset(data, "new")
    assert base.class_names == ["5", "6", "7"] and new.class_names == ["8", "9"]
    new.setup("test")
    labels = {int(y) for _, y in new.datasets["test"]}
    assert labels == {0, 1}  # relabelled to 0..k-1
    assert len(new.datasets["train"]) == 2 * 2  # K-shot per class survives the subset
    out = evaluate_base_to_new(module, data, lambda: _trainer(limit_test_batches=1))
    assert out["hm"] == pytest.approx(harmonic_mean(out["base_acc"], out["new_acc"]))


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_k_shot_protocol_is_seeded_with_min_k_4_validation(shots):
    a = Digits(task="target", num_shots=shots, seed=3, data_config={"input_size": (3, 16, 16), "mean": (0.5,) * 3,
                                                                     "std": (0.5,) * 3})
    a.setup("fit")
    counts = torch.bincount(a.datasets["train"].tensors[1], minlength=5)
    val_counts = torch.bincount(a.datasets["val"].tensors[1], minlength=5)
    assert counts.tolist() == [shots] * 5 and val_counts.tolist() == [min(shots, 4)] * 5
    b = Digits(task="target", num_shots=shots, seed=3, data_dir=str(a.data_dir / "elsewhere"),
               data_config=a.data_config())
    b.setup("fit")
    assert b.splits == a.splits  # the same seed gives the same images, cached or not


# ---- recipes --------------------------------------------------------------------------------------------
COOP_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]


def test_recipes_hold_the_paper_settings():
    import yaml

    from tests.conftest import REPO

    for key in COOP_DATASETS:
        cfg = yaml.safe_load((REPO / "configs" / "experiment" / f"coop_vit_b16_{key}.yaml").read_text())
        ad, opt, data = cfg["model"]["adaptation"]["init_args"], cfg["model"]["optimizer"], cfg["data"]["init_args"]
        assert (ad["n_ctx"], ad["class_token_position"], ad["class_specific"]) == (16, "end", False), key
        assert opt["class_path"] == "torch.optim.SGD" and opt["init_args"]["lr"] == 0.002, key
        assert (data["batch_size"], data["num_shots"]) == (32, 16), key
        assert cfg["trainer"]["max_epochs"] == (50 if key == "imagenet" else 200), key
        assert len(resolve_templates(key)) == 1, key  # CoOp has a hand-crafted template for it


def test_a_recipe_runs_on_coop_data(tmp_path):
    from lightning_transfer.cli import TransferCLI
    from lightning_transfer.schedulers import WarmupCosineLR
    from tests.conftest import REPO
    from tests.helpers.coop_data import coop_pets
    from tests.helpers.tiny_clip import tiny_clip_dir

    coop_pets(tmp_path / "data")  # CoOp's layout: oxford_pets/images + split_zhou_OxfordPets.json
    cli = TransferCLI(args=[
        "fit", "--config", str(REPO / "configs/experiment/coop_vit_b16_oxford_pets.yaml"),
        f"--model.backbone.init_args.model_name_or_path={tiny_clip_dir()}",
        f"--data.init_args.data_dir={tmp_path / 'data'}",
        "--model.adaptation.init_args.n_ctx=4",  # the tiny vocabulary spells most words letter by letter
        "--data.init_args.num_shots=1", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
        "--trainer.precision=32-true", "--trainer.max_epochs=1", "--trainer.logger=false", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false"])
    assert cli.model.class_names == ["abyssinian", "american bulldog", "beagle"]  # CoOp's names from the split file
    assert cli.model.adaptation.class_names == ["abyssinian", "american bulldog", "beagle"]
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    # one epoch done: the warm-up (1e-5) is over and the cosine starts at the base lr
    assert isinstance(scheduler, WarmupCosineLR) and cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.002


def test_base_to_new_recipe_trains_on_the_base_half(tmp_path):
    from lightning_transfer.cli import TransferCLI
    from tests.conftest import REPO
    from tests.helpers.coop_data import coop_pets
    from tests.helpers.tiny_clip import tiny_clip_dir

    coop_pets(tmp_path / "data")
    cli = TransferCLI(args=[
        "--config", str(REPO / "configs/experiment/cocoop_b2n_vit_b16_oxford_pets.yaml"),
        f"--model.backbone.init_args.model_name_or_path={tiny_clip_dir()}",
        f"--data.init_args.data.init_args.data_dir={tmp_path / 'data'}",
        "--data.init_args.data.init_args.num_workers=0",
        "--trainer.precision=32-true", "--trainer.logger=false"], run=False)
    assert isinstance(cli.datamodule, ClassSubset) and cli.datamodule.subset == "base"
    assert cli.model.class_names == ["abyssinian", "american bulldog"]  # ceil(3 / 2) base classes
