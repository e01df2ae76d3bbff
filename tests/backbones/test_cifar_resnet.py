"""CIFAR ResNet backbones: the contract, the original ResNet-20 checkpoint reproduced, safe loading."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lightning_transfer.backbones.cifar_resnet import CIFAR_RESNET_DEPTHS, CIFARResNet, CIFARResNet20
from lightning_transfer.registry import BACKBONES


@pytest.fixture(autouse=True)
def _one_thread():  # a busy shared machine oversubscribed by torch's thread pool runs small models far slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cifar_inputs(images: np.ndarray, backbone: CIFARResNet) -> torch.Tensor:
    cfg = backbone.data_config()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, 32, 32)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("depth", sorted(CIFAR_RESNET_DEPTHS))
def test_depths_parameter_counts_and_registry(depth):
    backbone = BACKBONES.get(f"cifar_resnet{depth}")()
    n = CIFAR_RESNET_DEPTHS[depth]
    assert depth == 6 * n + 2
    assert [len(stage) for stage in backbone.blocks] == [n, n, n]
    convs = sum(1 for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert convs + 1 == depth  # conv layers + the linear classifier
    if depth == 20:
        assert sum(p.numel() for p in backbone.parameters()) == 269_722  # the published ResNet-20 size


def test_contract_tokens_hidden_states_and_layer_ids():
    torch.manual_seed(0)
    backbone = CIFARResNet(depth=20).eval()
    assert not backbone.has_tokens and backbone.depth == 3
    x = torch.randn(2, 3, 32, 32)
    out = backbone.forward_tokens(x, return_hidden_states=True)
    assert out.pooled.shape == (2, 64) and len(out.hidden_states) == 4
    assert [h.shape[1:] for h in out.hidden_states] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    # composing the pieces equals a direct forward of the same layers
    direct = backbone.layer3(backbone.layer2(backbone.layer1(torch.relu(backbone.bn1(backbone.conv1(x))))))
    torch.testing.assert_close(out.pooled, direct.mean((2, 3)), atol=1e-6, rtol=0)
    ids = backbone.layer_ids()
    assert ids["conv1.weight"] == 0 and ids["layer1.0.conv1.weight"] == 1 and ids["layer3.2.bn2.bias"] == 3
    assert ids["linear.weight"] == 4


def test_bad_depth_and_missing_file_errors(tmp_path):
    with pytest.raises(ValueError, match="depth must be one of"):
        CIFARResNet(depth=18)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CIFARResNet20(checkpoint_path=str(tmp_path / "nope.npz"))


def test_npz_and_torch_files_load_and_mismatch_is_named(tmp_path):
    torch.manual_seed(1)
    source = CIFARResNet20()
    state = {f"module.{k}": v.numpy() for k, v in source.state_dict().items() if "num_batches" not in k}
    np.savez(tmp_path / "w.npz", **state)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "w.th")
    for name in ("w.npz", "w.th"):
        loaded = CIFARResNet20(checkpoint_path=str(tmp_path / name))
        for k, v in source.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing keys"):
        CIFARResNet(depth=32, checkpoint_path=str(tmp_path / "w.npz"))
    np.savez(tmp_path / "obj.npz", a=np.array([object()], dtype=object))
    with pytest.raises(ValueError):  # allow_pickle=False refuses object arrays
        CIFARResNet20(checkpoint_path=str(tmp_path / "obj.npz"))


def test_pickled_code_is_refused_with_a_hint(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.th"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ValueError, match="npz"):
        CIFARResNet20(checkpoint_path=str(path))


@pytest.mark.parametrize("filename", ["resnet20_state_dict.npz", "resnet20-12fca82f.th"])
def test_original_resnet20_reproduces_reference_logits(shared_data, filename):
    backbone = CIFARResNet20(checkpoint_path=str(shared_data / "resnet_cifar10" / filename)).eval()
    test = np.load(shared_data / "cifar10_test1000" / "cifar10_test_first1000.npz")
    reference = torch.from_numpy(np.load(shared_data / "resnet_cifar10" / "resnet20_logits_cifar10_test_first1000.npy"))
    with torch.no_grad():
        logits = backbone.reference_logits(_cifar_inputs(test["x"], backbone))
    torch.testing.assert_close(logits, reference, atol=1e-3, rtol=0)
    accuracy = (logits.argmax(1).numpy() == test["y"]).mean()
    assert accuracy == pytest.approx(0.915, abs=1e-9)


def test_gray_data_config_fits_the_three_channels():
    # the quickstart's 1-channel digit statistics carried over to this 3-channel backbone: one value stands for all
    # three (as TimmBackbone does); this failed inside Digits.setup with "shape '[1, 3, 1, 1]' is invalid"
    from lightning_transfer.datamodules import Digits

    backbone = CIFARResNet20(data_config={"mean": [0.3], "std": [0.35]}).eval()
    cfg = backbone.data_config()
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.3,) * 3 and cfg["std"] == (0.35,) * 3
    data = Digits(task="target", num_shots=2, data_config=cfg)
    data.setup()
    x, _ = next(iter(data.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32) and backbone(x).shape == (len(x), 64)


def test_data_config_that_cannot_fit_fails_when_built(tmp_path):
    with pytest.raises(ValueError, match="data_config mean has 2 values but CIFARResNet20 takes 3-channel input: "
                                         "give 3 values"):
        CIFARResNet20(data_config={"mean": [0.3, 0.3], "std": [0.35]})
    with pytest.raises(ValueError, match=r"data_config input_size \(1, 32, 32\) has 1 channels but CIFARResNet32 "
                                         r"takes 3-channel input"):
        BACKBONES.get("cifar_resnet32")(data_config={"input_size": [1, 32, 32]})


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_truncated_weight_file_names_the_path(tmp_path, suffix):
    from safetensors.torch import save_file

    state = {k: v for k, v in CIFARResNet20().state_dict().items() if "num_batches" not in k}
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".npz":
        np.savez(whole, **{k: v.numpy() for k, v in state.items()})
    else:
        save_file(state, str(whole))
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(whole.read_bytes()[:200])
    where = re.escape(str(truncated))
    with pytest.raises(ValueError, match=rf"cannot read '{where}' as .*The file is truncated") as info:
        CIFARResNet20(checkpoint_path=str(truncated))
    assert "Legacy (pre-1.6)" not in str(info.value)  # the .th pickle advice is not about these formats
