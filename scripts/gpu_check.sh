#!/usr/bin/env bash
# One short run on a CUDA machine checks the GPU paths (a few minutes on one GPU):
#   1. every registered strategy (each contract case) takes one accumulated, clipped optimizer step in bf16-mixed and
#      16-mixed on the GPU, with a table of peak CUDA memory per case (scripts/gpu_check.py);
#   2. the contract-level precision tests on the GPU (LT_TEST_ACCELERATOR=cuda) and the gpu-marked tests (FSDP, and the
#      CUDA-only paths in tests/test_cuda_paths.py).
# Without a CUDA device it says so and exits 0. Usage: scripts/gpu_check.sh   (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False): skipped"
    exit 0
fi

status=0
echo "== one step per strategy in bf16-mixed and 16-mixed, peak CUDA memory per case"
timeout 240 "$PYTHON" scripts/gpu_check.py --device cuda --precision bf16-mixed 16-mixed || status=1
echo "== contract precision tests on the GPU and gpu-marked tests"
LT_TEST_ACCELERATOR=cuda timeout 180 "$PYTHON" -m pytest -q -p no:warnings -m "gpu or not slow" \
    tests/strategies/test_precision.py tests/test_fsdp.py tests/test_cuda_paths.py || status=1
if [ "$status" -eq 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED"; fi
exit $status
