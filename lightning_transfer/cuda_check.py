"""Keep torch's "is CUDA available?" check cheap while training on a machine with no GPU.

Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, so that ``torch.cuda.is_available()`` asks NVML rather
than initialising the CUDA driver, which would break CUDA in processes forked later (DataLoader workers, ``ddp_fork``).
Until CUDA has been initialised, torch does not cache that answer: each call loads the NVML library again and, where
there is no NVIDIA driver, falls back to the CUDA runtime anyway. Adam, AdamW, RMSprop and most of torch's other
optimizers make that call on every ``step()`` (their CUDA-graph capture check). On the 2-core development machine
(CUDA build of torch, no GPU) a quickstart LinearProbe training step took 21.28 ms with the flag and 20.37 ms without
it (``python benchmarks/cuda_check_cost.py``, median of 352 neighbouring step pairs, 0.56 ms saved per pair).

Where no GPU is visible there is no CUDA state that a fork could break, so the flag buys nothing and
:func:`skip_nvml_check_without_gpus` clears it. With a GPU visible it is left as Lightning set it (and once CUDA is
initialised torch caches the device count, so training on the GPU never paid this cost).
"""

from __future__ import annotations

import os

import torch

NVML_CHECK_VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_check_without_gpus() -> bool:
    """Clear ``PYTORCH_NVML_BASED_CUDA_CHECK`` when torch is built with CUDA but sees no GPU; True if it did.

    Left alone: a CPU-only build of torch (its check is already free), a visible GPU, or a value other than the
    ``"1"`` Lightning sets.
    """
    if os.environ.get(NVML_CHECK_VARIABLE) != "1" or not torch.backends.cuda.is_built():
        return False
    # asked through NVML where it loads (which does not initialise CUDA); without NVML torch asks the CUDA runtime,
    # as it would on every check anyway
    if torch.cuda.device_count() > 0:
        return False
    del os.environ[NVML_CHECK_VARIABLE]
    return True
