"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.offline_data import offline_dataset  # noqa: F401 - a session fixture for the tests below


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is several times faster than two
    contending with other processes (measured 15 s vs 98 s for the overfit tests under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
