"""Test-wide isolation: seeded, offline (no network, W&B offline in a temp dir), data and splits in a temp dir."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _is_local(address: object) -> bool:
    if isinstance(address, (str, bytes)):  # unix socket path
        return True
    host = address[0] if isinstance(address, tuple) else ""
    return host in ("localhost", "::1", "") or str(host).startswith("127.")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LT_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "wandb").mkdir()
    real_connect = socket.socket.connect

    def guarded_connect(self, address):  # tests never reach the network
        if not _is_local(address):
            raise RuntimeError(f"test tried to open a network connection to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data test: {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


def pytest_configure(config):
    os.environ.setdefault("WANDB_SILENT", "true")
    # the test models are tiny: one thread avoids oversubscribing a shared 2-core machine (much faster there)
    torch.set_num_threads(1)
