"""The real entry point: subcommands, composed configs, links, print_config, W&B offline, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_transfer.__main__ import main
from lightning_transfer.cli import TransferCLI
from tests.conftest import REPO

QUICK = str(REPO / "configs" / "quickstart.yaml")
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_model_summary=false"]
NO_LOGGER = ["--trainer.logger=false"]


def test_python_m_list_prints_every_registry():
    out = subprocess.run([sys.executable, "-m", "lightning_transfer", "list"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    for line in ("backbones:", "adaptation strategies", "test-time methods", "datamodules",
                 "full", "FullFinetune", "linear_probe", "partial_freeze", "digits", "image_folder", "timm"):
        assert line in out


def test_composed_configs_links_and_overrides():
    cli = TransferCLI(args=["--config", str(REPO / "configs/defaults.yaml"),
                            "--config", str(REPO / "configs/backbone/digits_vit.yaml"),
                            "--config", str(REPO / "configs/data/digits_target.yaml"),
                            "--config", str(REPO / "configs/strategy/partial_freeze.yaml"),
                            "--model.adaptation.init_args.num_frozen_blocks=2", "--data.init_args.num_shots=3",
                            *NO_LOGGER], run=False)
    assert type(cli.model.adaptation).__name__ == "PartialFreeze" and cli.model.adaptation.num_frozen_blocks == 2
    assert cli.datamodule.num_shots == 3 and cli.trainer.max_epochs == 10  # from defaults.yaml
    assert cli.model.num_classes == 5 and cli.model.class_names == ["5", "6", "7", "8", "9"]  # linked from data


def test_short_names_and_registry_names_choose_the_strategy():
    for name in ("LinearProbe", "linear_probe"):
        cli = TransferCLI(args=["--config", QUICK, f"--model.adaptation={name}", *NO_LOGGER], run=False)
        assert type(cli.model.adaptation).__name__ == "LinearProbe"


def test_print_config_output_runs_as_is(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICK, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "TimmBackbone" in printed and "model_name: test_vit" in printed
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    cli = TransferCLI(args=["fit", "--config", str(path), *FAST, *NO_LOGGER])
    assert cli.trainer.state.finished


def test_fit_logs_to_wandb_offline(tmp_path):
    cli = TransferCLI(args=["fit", "--config", QUICK, *FAST])
    run = cli.trainer.logger.experiment
    try:
        summary = dict(run.summary)
        for key in ("train/loss", "val/acc", "params/trainable", "params/total", "perf/train_samples_per_s",
                    "memory/saved_for_backward_mb", "memory/peak_rss_mb", "checkpoint/size_mb"):
            assert key in summary, key
        assert run.config["model.adaptation.class_path"].endswith("FullFinetune")
        assert run.config["data.init_args.num_shots"] == 5
        run_dir = Path(run.dir).parent
        assert run_dir.name.startswith("offline-run-") and run_dir.is_dir()
        saved = yaml.safe_load((Path(run.dir) / "config.yaml").read_text())
        assert saved["data"]["init_args"]["num_shots"] == 5 and saved["trainer"]["max_epochs"] == 1
    finally:
        run.finish()
    assert list(run_dir.glob("*.wandb")), "no offline run file to `wandb sync`"


def test_test_subcommand_reloads_fit_checkpoint():
    cli = TransferCLI(args=["fit", "--config", QUICK, *FAST, *NO_LOGGER, "--trainer.default_root_dir=out"])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    assert Path(ckpt).is_file()
    tested = TransferCLI(args=["test", "--config", QUICK, "--ckpt_path", ckpt, *NO_LOGGER])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/acc"]) <= 1.0
    # a flag the checkpoint's settings would override is refused, not ignored; one that agrees with them is fine
    with pytest.raises(ValueError, match=r"--model.adaptation=LinearProbe \(the checkpoint has FullFinetune\)"):
        TransferCLI(args=["test", "--config", QUICK, "--model.adaptation=linear_probe", "--ckpt_path", ckpt,
                          *NO_LOGGER])
    with pytest.raises(ValueError, match=r"model_kwargs.patch_size=4 \(the checkpoint has 2\)"):
        TransferCLI(args=["test", "--config", QUICK, "--model.backbone.init_args.model_kwargs.patch_size=4",
                          "--ckpt_path", ckpt, *NO_LOGGER])
    agreed = TransferCLI(args=["test", "--config", QUICK, "--model.adaptation=FullFinetune", "--ckpt_path", ckpt,
                               *NO_LOGGER])
    assert agreed.trainer.callback_metrics["test/acc"] == tested.trainer.callback_metrics["test/acc"]


def test_unreadable_or_missing_checkpoints_are_named_before_anything_runs(tmp_path, caplog, monkeypatch):
    cli = TransferCLI(args=["fit", "--config", QUICK, *FAST, *NO_LOGGER, f"--trainer.default_root_dir={tmp_path}"])
    whole = Path(cli.trainer.checkpoint_callback.last_model_path).read_bytes()
    # a config file naming another strategy: the checkpoint's is used, and the run says so
    with caplog.at_level("INFO"):
        TransferCLI(args=["test", "--config", QUICK, "--config", str(REPO / "configs/strategy/linear_probe.yaml"),
                          "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path, *NO_LOGGER])
    assert "rebuilt with the checkpoint's settings: model.adaptation=FullFinetune (the config has LinearProbe)" \
        in caplog.text
    (tmp_path / "cut.ckpt").write_bytes(whole[:20000])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    for name in ("cut.ckpt", "text.ckpt"):
        path = str(tmp_path / name)
        for sub in ("test", "fit"):
            with pytest.raises(ValueError, match=f"cannot read checkpoint '{path}'.*Pass a complete checkpoint"):
                TransferCLI(args=[sub, "--config", QUICK, "--ckpt_path", path, *NO_LOGGER])
    with pytest.raises(FileNotFoundError, match="--ckpt_path 'nope.ckpt' does not exist: pass a .ckpt written by fit"):
        TransferCLI(args=["test", "--config", QUICK, "--ckpt_path", "nope.ckpt", *NO_LOGGER])
    # a checkpoint that does not fit the model, from the command line: the message, not a traceback
    monkeypatch.setattr(sys, "argv", ["lightning_transfer", "test", "--config", QUICK, *NO_LOGGER,
                                      "--data.init_args.target_classes=[5,6,7]", "--ckpt_path",
                                      cli.trainer.checkpoint_callback.last_model_path])
    monkeypatch.delenv("LIGHTNING_TRANSFER_TRACEBACK", raising=False)
    with pytest.raises(SystemExit, match="error: CheckpointMismatch: checkpoint head has 5 classes but this model has "
                                         "num_classes=3"):
        main()


# ---- bad input: clear errors before the first training step ----------------------------------------------------
def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        TransferCLI(args=args, run=False)
    return capsys.readouterr().err


def test_unknown_strategy_lists_the_registered_ones(capsys):
    err = _error(["--config", QUICK, "--model.adaptation=Lorax", *NO_LOGGER], capsys)
    assert "Lorax" in err and "Registered choices for model.adaptation" in err and "FullFinetune (full)" in err


def test_an_unknown_option_of_the_right_strategy_lists_its_options_not_the_strategies(capsys):
    err = _error(["--config", QUICK, "--model.adaptation=LoRA", "--model.adaptation.rank=16", *NO_LOGGER], capsys)
    assert "LoRA has no option 'rank'; did you mean 'r'? LoRA's options: r, alpha," in err
    assert "Registered choices" not in err


def test_a_misspelt_key_gets_the_closest_keys_and_no_usage_block(capsys, tmp_path):
    err = _error(["--config", QUICK, "--trainer.max_epohcs=2", *NO_LOGGER], capsys)
    assert "unrecognized arguments: --trainer.max_epohcs=2" in err
    assert "--trainer.max_epohcs: did you mean --trainer.max_epochs" in err
    assert "--trainer.accelerator" not in err and len(err.splitlines()) <= 6  # argparse's usage block was 60 lines
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_epohcs: 2\n")
    err = _error(["--config", QUICK, "--config", str(tmp_path / "bad.yaml"), *NO_LOGGER], capsys)
    assert "does not accept option" in err and "--trainer.max_epohcs: did you mean --trainer.max_epochs" in err
    err = _error(["--config", QUICK, "--trainer.nonsense_flag=1", *NO_LOGGER], capsys)
    assert "unrecognized arguments" in err and "did you mean" not in err  # nothing close: no guess


def test_unknown_backbone_class_lists_the_registered_ones(capsys):
    err = _error(["--config", QUICK, "--model.backbone=NoSuchBackbone", *NO_LOGGER], capsys)
    assert "NoSuchBackbone" in err and "Registered choices for model.backbone" in err and "TimmBackbone" in err


def test_unknown_timm_model_name(capsys):
    with pytest.raises(ValueError, match="unknown timm model_name 'vit_tiniest'"):
        TransferCLI(args=["--config", QUICK, "--model.backbone.init_args.model_name=vit_tiniest", *NO_LOGGER],
                    run=False)


def test_config_key_no_constructor_has(capsys):
    err = _error(["--config", QUICK, "--model.adaptation=LinearProbe", "--model.adaptation.init_args.rank=4",
                  *NO_LOGGER], capsys)
    assert "rank" in err and "not accepted" in err


def test_missing_backbone_checkpoint_file():
    with pytest.raises(FileNotFoundError, match="checkpoint_path 'nowhere/backbone.safetensors' does not exist"):
        TransferCLI(args=["--config", QUICK, "--model.backbone.init_args.checkpoint_path=nowhere/backbone.safetensors",
                          *NO_LOGGER], run=False)


def test_image_folder_pointed_at_missing_folder():
    # jsonargparse re-raises the constructor's FileNotFoundError inside its own ValueError, message intact
    with pytest.raises((FileNotFoundError, ValueError), match="no training folder at .*missing_data.*<class>/<image>"):
        TransferCLI(args=["--config", QUICK, "--data=ImageFolder", "--data.init_args.root=missing_data", *NO_LOGGER],
                    run=False)


def test_a_csv_logger_version_that_holds_a_run_is_refused_before_its_metrics_are_deleted(tmp_path):
    csv = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
           "--trainer.logger.init_args.version=7"]
    TransferCLI(args=["fit", "--config", QUICK, *FAST, *csv])
    (metrics,) = tmp_path.glob("*/version_7/metrics.csv")  # <save_dir>/<name>/version_7
    written = metrics.read_text()
    assert "train/loss" in written
    with pytest.raises(FileExistsError, match="version 7 folder .*version_7' holds an earlier run's logs"):
        TransferCLI(args=["fit", "--config", QUICK, *FAST, *csv])
    assert metrics.read_text() == written  # Lightning's logger would have deleted it on start


def test_command_line_errors_before_anything_ran_show_the_message_not_a_traceback(monkeypatch):
    argv = ["lightning_transfer", "fit", "--config", QUICK, "--model.backbone.init_args.model_name=no_such_vit",
            *NO_LOGGER]
    monkeypatch.setattr(sys, "argv", list(argv))
    monkeypatch.delenv("LIGHTNING_TRANSFER_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main()
    assert str(stopped.value.code).startswith("error: ValueError: unknown timm model_name 'no_such_vit'")
    assert "LIGHTNING_TRANSFER_TRACEBACK=1" in str(stopped.value.code)
    monkeypatch.setattr(sys, "argv", list(argv))
    monkeypatch.setenv("LIGHTNING_TRANSFER_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown timm model_name"):  # the traceback, on request
        main()
    with pytest.raises(ValueError, match="unknown timm model_name"):  # and always from Python (main(argv))
        main(argv[1:])
    # a datamodule's own error, without jsonargparse's list of the Union subtypes it tried and the given config
    monkeypatch.delenv("LIGHTNING_TRANSFER_TRACEBACK")
    monkeypatch.setattr(sys, "argv", ["lightning_transfer", "fit", "--config", QUICK, "--data=ImageFolder",
                                      "--data.init_args.root=/no/such/folder", *NO_LOGGER])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert str(stopped.value.code).splitlines()[0] == (
        "error: ImageFolder: no training folder at '/no/such/folder/train'; lay the data out as "
        "/no/such/folder/train/<class>/<image> (val/ and test/ optional) or fix data.root")


def _tiny_clip_config(tmp_path: Path, adaptation: str) -> list[str]:
    """QUICK with the tiny CLIP as backbone and a CSV logger under ``tmp_path`` (whose folder shows a started run)."""
    from tests.helpers.tiny_clip import tiny_clip_dir

    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": {
        "class_path": "lightning_transfer.backbones.hf_clip.HFCLIPBackbone",
        "init_args": {"model_name_or_path": tiny_clip_dir()}}, "adaptation": {"class_path": adaptation}}}))
    runs = tmp_path / "runs"
    return ["--config", QUICK, "--config", str(path), "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.default_root_dir={runs}"]


def test_fit_with_a_strategy_that_trains_nothing_is_refused_before_the_run_starts(tmp_path):
    with pytest.raises(ValueError, match="ZeroShotCLIP trains nothing, so there is nothing to fit: run validate or "
                                         "test") as refused:
        TransferCLI(args=["fit", *_tiny_clip_config(tmp_path, "ZeroShotCLIP")])
    assert getattr(refused.value, "lightning_transfer_before_training", False)  # the CLI prints the message alone
    assert not (tmp_path / "runs").exists(), "no run folder for a run that cannot start"


def test_clip_prompts_from_placeholder_class_names_are_refused_before_the_run_starts(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "list.csv").write_text("".join(f"{i}.png,{i % 2}\n" for i in range(4)))  # integer labels only
    data = ["--data=lightning_transfer.datamodules.csv_images.CSVImages",
            f"--data.init_args.csv_file={tmp_path / 'list.csv'}", "--data.init_args.num_shots=null"]
    with pytest.raises(ValueError, match=r"CoOp builds its classifier from class names, but CSVImages has only "
                                         r"placeholders \('0', '1'\).*data.init_args.class_names"):
        TransferCLI(args=["fit", *_tiny_clip_config(tmp_path, "CoOp"), *data])
    assert not (tmp_path / "runs").exists(), "no run folder for a run that cannot start"
    named = TransferCLI(args=[*_tiny_clip_config(tmp_path, "CoOp"), *data, "--data.init_args.class_names=[cat, dog]"],
                        run=False)
    assert named.model.adaptation.class_names == ["cat", "dog"]


def test_a_text_backbone_with_an_image_datamodule_is_refused_before_the_run_starts(tmp_path):
    from tests.helpers.text_models import tiny_bert_dir

    args = ["fit", "--config", QUICK, "--model.backbone=lightning_transfer.backbones.hf_text.HFTextBackbone",
            f"--model.backbone.init_args.model_name_or_path={tiny_bert_dir()}", "--model.adaptation=LinearProbe",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    with pytest.raises(ValueError, match=r"HFTextBackbone \(hf_text:.*\) reads token ids .* but Digits yields images: "
                                         r"choose a text datamodule \(text_csv"):
        TransferCLI(args=args)
    assert not (tmp_path / "runs").exists(), "no run folder for a run that cannot start"


def test_evaluating_last_takes_the_newest_earlier_run_and_never_an_untrained_model(tmp_path):
    where = ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    test = ["test", "--config", QUICK, *where, "--trainer.limit_test_batches=1"]
    with pytest.raises(FileNotFoundError, match=r"test --ckpt_path last: no last.ckpt of an earlier run .*untrained"):
        TransferCLI(args=[*test, "--ckpt_path", "last"])
    with pytest.raises(FileNotFoundError, match="'best' is the best checkpoint of a fit in the same process"):
        TransferCLI(args=[*test, "--ckpt_path", "best"])
    fit = TransferCLI(args=["fit", "--config", QUICK, *FAST, *where])
    last = fit.trainer.checkpoint_callback.last_model_path
    tested = TransferCLI(args=[*test, "--ckpt_path", "last"])
    assert tested.config.test.ckpt_path == last
    assert torch.equal(tested.model.head.fc.weight, fit.model.head.fc.weight)  # the trained head, not a new one
    with pytest.warns(UserWarning, match="test without --ckpt_path evaluates the model as the config builds it"):
        TransferCLI(args=test)


def test_a_component_s_help_takes_its_registry_name():
    from lightning_transfer.cli import resolve_registry_names

    lora = "lightning_transfer.strategies.lora.LoRA"
    assert resolve_registry_names(["fit", "--model.adaptation.help", "lora"]) == ["fit", "--model.adaptation.help",
                                                                                   lora]
    assert resolve_registry_names(["--model.adaptation.help=lora"]) == [f"--model.adaptation.help={lora}"]
    assert resolve_registry_names(["--model.adaptation=lora"]) == [f"--model.adaptation={lora}"]


def test_top_level_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "{fit,validate,test,predict,list,export,bench}" in printed and "bench summarize" in printed


def test_a_run_without_a_logger_saves_its_config_and_never_over_an_earlier_one(tmp_path):
    root = tmp_path / "out"
    for epochs in (1, 2):
        TransferCLI(args=["fit", "--config", QUICK, *FAST, *NO_LOGGER, f"--trainer.max_epochs={epochs}",
                          f"--trainer.default_root_dir={root}"])
    first, second = (yaml.safe_load((root / name).read_text()) for name in ("config.yaml", "config-1.yaml"))
    assert first["trainer"]["max_epochs"] == 1 and second["trainer"]["max_epochs"] == 2
    rerun = TransferCLI(args=["fit", "--config", str(root / "config-1.yaml"), "--trainer.limit_train_batches=1"])
    assert rerun.trainer.state.finished and rerun.trainer.max_epochs == 2  # the saved config runs as is
    assert yaml.safe_load((root / "config-2.yaml").read_text())["trainer"]["limit_train_batches"] == 1


@pytest.mark.parametrize("flags", [["--optimizer=SGD", "--optimizer.lr=0.1"], ["--optimizer", "SGD", "--optimizer.lr",
                                                                              "0.1"]])
def test_the_optimizer_flag_keeps_the_strategys_parameter_groups(flags):
    # LightningCLI's own --optimizer would replace configure_optimizers with one group of model.parameters()
    cli = TransferCLI(args=["--config", QUICK, *flags, "--trainer.logger=false", "--model.optimizer.weight_decay=0.05"],
                      run=False)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) >= 2
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}  # norms and biases undecayed
    assert all(g["lr"] == pytest.approx(0.1 * g.get("lr_scale", 1.0)) for g in optimizer.param_groups)


def test_a_top_level_optimizer_in_a_config_is_not_silently_applied(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args: {lr: 0.1}\n")
    with pytest.raises(SystemExit):
        TransferCLI(args=["--config", QUICK, "--config", str(config), "--trainer.logger=false"], run=False)
