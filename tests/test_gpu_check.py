"""scripts/gpu_check.sh: skips cleanly without CUDA; its Python part runs the same code on the CPU (a dry run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_on_cpu_prints_a_row_per_case(capsys):
    code = _gpu_check().main(["--device", "cpu", "--precision", "bf16-mixed", "--strategies", "linear_probe"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("linear_probe-")]
    assert len(rows) == 4 and all(line.rstrip().endswith("ok") for line in rows), out
    assert "4 passed, 0 failed" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")
def test_gpu_check_script_skips_without_cuda():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout and "skipped" in proc.stdout, proc.stderr
