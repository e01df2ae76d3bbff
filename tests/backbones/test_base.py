"""Shared backbone helpers: weight files that cannot be read name the path, mean/std fit the input channels."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lightning_transfer.backbones.base import read_state_dict
from lightning_transfer.backbones.timm import TimmBackbone


def test_truncated_safetensors_names_the_path(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_file({"weight": torch.arange(64, dtype=torch.float32).view(8, 8), "bias": torch.zeros(8)}, str(whole))
    assert torch.equal(read_state_dict(whole)["bias"], torch.zeros(8))
    data = whole.read_bytes()
    for name, cut in (("header.safetensors", 4), ("body.safetensors", len(data) - 10)):  # header / tensors cut off
        truncated = tmp_path / name
        truncated.write_bytes(data[:cut])
        where = re.escape(str(truncated))
        with pytest.raises(ValueError, match=rf"cannot read '{where}' as a safetensors file: .*The file is "
                                             "truncated .* or not a safetensors file"):
            read_state_dict(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=rf"'{re.escape(str(text))}'.*not a safetensors file"):
        read_state_dict(text)


def test_per_channel_stats_broadcasts_one_value_and_rejects_other_counts():
    from lightning_transfer.backbones.base import per_channel_stats

    defaults = {"input_size": [3, 32, 32], "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)}
    one = per_channel_stats({**defaults, "mean": [0.3], "std": 0.35}, {"mean": [0.3], "std": 0.35}, "Net")
    assert one["input_size"] == (3, 32, 32) and one["mean"] == (0.3,) * 3 and one["std"] == (0.35,) * 3
    gray = per_channel_stats({**defaults, "input_size": (1, 8, 8)}, {"input_size": (1, 8, 8)}, "Net")
    assert gray["mean"] == pytest.approx((0.4,)) and gray["std"] == pytest.approx((0.2,))  # the model's own, averaged
    with pytest.raises(ValueError, match="data_config mean has 2 values but Net takes 3-channel input: give 3 values "
                                         r"\(or one for every channel\) or drop mean from data_config"):
        per_channel_stats({**defaults, "mean": [0.3, 0.3]}, {"mean": [0.3, 0.3]}, "Net")
    with pytest.raises(ValueError, match=r"data_config input_size \(1, 32, 32\) has 1 channels but Net takes "
                                         r"3-channel input: give input_size \(3, H, W\)"):
        per_channel_stats({**defaults, "input_size": (1, 32, 32)}, {"input_size": (1, 32, 32)}, "Net", 3)


def test_timm_checks_data_config_when_built():
    with pytest.raises(ValueError, match="data_config std has 2 values but timm:test_vit takes 3-channel input"):
        TimmBackbone("test_vit", model_kwargs={"img_size": 32}, data_config={"std": [0.2, 0.2]})
    gray = TimmBackbone("test_vit", model_kwargs={"img_size": 32, "in_chans": 1}, data_config={"mean": [0.3]})
    assert gray.data_config()["mean"] == (0.3,) and len(gray.data_config()["std"]) == 1


def test_timm_refuses_an_input_size_its_stem_cannot_take():
    with pytest.raises(ValueError, match=r"\(1, 32, 32\) has 1 channels but timm:test_resnet takes 3-channel"):
        TimmBackbone("test_resnet", data_config={"input_size": [1, 32, 32]})
    assert TimmBackbone("test_resnet", data_config={"input_size": [3, 32, 32]}).data_config()["input_size"][0] == 3
