"""`test --model.test_time=X --ckpt_path run.ckpt`: the method chosen at test time survives the checkpoint's
hyperparameters, and the CLI turns inference mode off for it."""

from __future__ import annotations

from lightning_transfer.cli import TransferCLI
from lightning_transfer.test_time.tent import Tent
from tests.conftest import REPO

QUICK = str(REPO / "configs" / "quickstart.yaml")
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def test_test_time_method_given_at_test_time_is_used_with_a_checkpoint():
    fit = TransferCLI(args=["fit", "--config", QUICK, *FAST])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert ckpt and fit.model.test_time is None
    cli = TransferCLI(args=["test", "--config", QUICK, "--config", str(REPO / "configs/test_time/tent.yaml"),
                            "--ckpt_path", ckpt, "--trainer.limit_test_batches=2", "--trainer.logger=false"])
    assert isinstance(cli.model.test_time, Tent)
    assert cli.config.test.trainer.inference_mode is False  # set by the CLI: the run would fail otherwise
    assert cli.model.test_time.optimizer is not None  # prepared and used (LayerNorm on the ViT)
    assert {type(m).__name__ for m in cli.model.test_time.layers} == {"LayerNorm"}


def test_the_checkpoint_s_method_is_not_used_unless_given_and_a_wrong_one_fails_first():
    import pytest

    fit = TransferCLI(args=["fit", "--config", QUICK, "--config", str(REPO / "configs/test_time/tent.yaml"), *FAST])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert isinstance(fit.model.test_time, Tent)  # saved with the model's settings
    plain = TransferCLI(args=["test", "--config", QUICK, "--ckpt_path", ckpt, "--trainer.logger=false",
                              "--trainer.limit_test_batches=1"])
    assert plain.model.test_time is None  # the source baseline stays measurable
    # BNAdapt on the quickstart ViT (LayerNorm only): refused when the model is built, before data or checkpoint
    with pytest.raises(ValueError, match="BNAdapt needs BatchNorm layers.*use Tent"):
        TransferCLI(args=["test", "--config", QUICK, "--config", str(REPO / "configs/test_time/bn_adapt.yaml"),
                          "--ckpt_path", ckpt, "--trainer.logger=false"])
