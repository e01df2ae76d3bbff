"""Test-time tests run single-threaded: on a shared, busy machine torch's thread pool oversubscribes the cores and
small models run ~50x slower; one thread keeps these tests fast and their numbers deterministic."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
