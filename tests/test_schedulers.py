"""WarmupCosineLR against the schedule CoOp's Dassl code produces (constant warm-up, then cosine)."""

import math

import pytest
import torch

from lightning_transfer.schedulers import WarmupCosineLR


def _lrs(scheduler, optimizer, epochs):
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_constant_warmup_then_cosine_per_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.002}, {"params": [params[1]], "lr": 0.02}])
    lrs = _lrs(WarmupCosineLR(optimizer, max_epochs=10, warmup_epochs=1, warmup_lr=1e-5), optimizer, 11)
    assert lrs[0] == pytest.approx([1e-5, 1e-5])  # epoch 0: the constant warm-up lr in every group
    assert lrs[1] == pytest.approx([0.002, 0.02])  # epoch 1: the cosine starts at the base lr
    for epoch in range(1, 11):
        expected = 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 10))
        assert lrs[epoch] == pytest.approx([0.002 * expected, 0.02 * expected])


def test_bad_arguments_fail_naming_them():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="max_epochs >= 1"):
        WarmupCosineLR(optimizer, max_epochs=0)
