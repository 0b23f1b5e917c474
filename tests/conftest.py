"""Shared by every test: tiny models run on one intra-op thread (OpenMP spin-waits are costly on a busy 2-core box)."""
import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
