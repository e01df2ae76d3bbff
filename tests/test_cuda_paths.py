"""Paths that behave differently on a CUDA device than on the CPU, checked on one (``scripts/gpu_check.sh``):

- the text backbone checks token ids against its vocabulary on a device's first batch only (one sync), and its
  output there matches the CPU's;
- a ``bf16-true`` checkpoint reloads onto a fresh fp32 backbone (the fingerprint is compared after the cast);
- a test-time method hands the model back after a CUDA test, so a second test starts from the source weights;
- a fit resumed inside an epoch (the running training sums travel in the checkpoint) ends as an uninterrupted one.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer.datamodules import Digits
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import FullFinetune, LinearProbe
from lightning_transfer.test_time.tent import Tent
from tests.helpers.models import tiny_cnn, tiny_vit
from tests.helpers.text_models import tiny_bert, token_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _trainer(**kw) -> Trainer:
    return Trainer(accelerator="cuda", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **kw)


def test_text_backbone_refuses_a_first_batch_outside_the_vocabulary_on_the_device():
    backbone = tiny_bert().cuda().eval()
    vocab = backbone.model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        backbone(torch.full((2, 5), vocab, device="cuda"))
    fresh = tiny_bert().eval()
    ids = token_inputs(fresh)
    with torch.no_grad():
        on_cpu = fresh(ids)
        on_gpu = fresh.cuda()(ids.cuda())
        again = fresh(ids.cuda())  # later batches are not checked again: same output, no extra sync
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, on_gpu)


def test_a_bf16_true_checkpoint_reloads_on_the_gpu(tmp_path):
    module = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    dm = Digits(task="target", num_shots=2, batch_size=5)
    trainer = _trainer(max_steps=2, limit_val_batches=0, precision="bf16-true")
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "bf16.ckpt")
    fresh = TransferModule(tiny_vit(), LinearProbe(), num_classes=5)
    validated = _trainer(limit_val_batches=1, precision="bf16-true").validate(
        fresh, datamodule=dm, ckpt_path=tmp_path / "bf16.ckpt", verbose=False)
    assert validated and torch.equal(fresh.head.fc.weight.cpu(), module.head.fc.weight.cpu())


def test_a_second_cuda_test_starts_from_the_source_model():
    g = torch.Generator().manual_seed(3)
    target = TensorDataset(torch.randn(30, 3, 32, 32, generator=g) * 1.7 + 0.7, torch.arange(30) % 5)
    torch.manual_seed(0)
    module = TransferModule(tiny_cnn(), FullFinetune(), num_classes=5, test_time=Tent())
    source = {k: v.clone() for k, v in module.state_dict().items()}
    first = _trainer(inference_mode=False).test(module, dataloaders=DataLoader(target, batch_size=10), verbose=False)
    for key, value in source.items():
        assert torch.equal(module.state_dict()[key].cpu(), value), key
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats for m in norms)
    second = _trainer(inference_mode=False).test(module, dataloaders=DataLoader(target, batch_size=10), verbose=False)
    assert second[0]["test/acc"] == first[0]["test/acc"]


def test_a_mid_epoch_resume_on_the_gpu_ends_as_an_uninterrupted_fit(tmp_path, monkeypatch):
    from tests.test_resume import _Crashed, _lora_fit, _trainable

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    whole = _lora_fit(tmp_path / "a", accelerator="cuda")
    with pytest.raises(_Crashed):
        _lora_fit(tmp_path / "b", crash_at=7, accelerator="cuda")  # last.ckpt after step 6, inside epoch 2
    resumed = _lora_fit(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"), accelerator="cuda")
    got = _trainable(resumed)
    for name, value in _trainable(whole).items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    for name in ("train/loss", "train/acc"):
        assert float(resumed.trainer.callback_metrics[name]) == pytest.approx(
            float(whole.trainer.callback_metrics[name]), abs=1e-5), name
