"""Mixed precision, gradient accumulation and clipping with every registered strategy.

Each contract case runs one optimizer step made of 2 accumulated batches, with ``gradient_clip_val=1.0``, under
``bf16-mixed`` on the CPU (``LT_TEST_ACCELERATOR=cuda`` runs the same cases on a GPU: ``scripts/gpu_check.sh``).
The first case of every strategy runs by default; the others are ``slow``.
"""

from __future__ import annotations

import math
import os

import pytest

from lightning_transfer.registry import STRATEGIES
from tests.helpers.precision import one_step
from tests.strategies.test_contract import CASES, _params

ACCELERATOR = os.environ.get("LT_TEST_ACCELERATOR", "cpu")
PRECISION = os.environ.get("LT_TEST_PRECISION", "bf16-mixed")


def _cases():
    seen: set[str] = set()
    out = []
    for param in _params():
        name = param.values[0]
        marks = [pytest.mark.slow] if name in seen else []
        seen.add(name)
        out.append(pytest.param(*param.values, id=param.id, marks=marks))
    return out


def test_every_strategy_has_a_default_precision_case():
    assert set(STRATEGIES.names()) <= set(CASES)


@pytest.mark.parametrize(("name", "case", "kind"), _cases())
def test_mixed_precision_step_with_accumulation_and_clipping(name, case, kind):
    if ACCELERATOR == "cuda":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("LT_TEST_ACCELERATOR=cuda but no CUDA device")
    result = one_step(name, case, kind, accelerator=ACCELERATOR, precision=PRECISION)
    assert result["losses"] and all(math.isfinite(x) for x in result["losses"]), result
    assert not result["frozen_changed"], f"frozen parameters changed: {result['frozen_changed'][:5]}"
    if STRATEGIES.get(name).trains_nothing:
        return
    assert len(result["losses"]) == 2 and result["steps"] == 1  # two batches accumulated into one step
    assert math.isfinite(result["grad_norm"]) and result["trainable_changed"], result
