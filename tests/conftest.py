"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test problems are tiny: intra-op threads only add overhead, and on a busy 2-core machine
    OpenMP contention made the suite several times slower. Restored at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
