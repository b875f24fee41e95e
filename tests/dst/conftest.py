"""Shared setup of the dst tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other processes
    and elementwise ops run 10-50x slower (measured: abs_ of 671 k floats 6 ms vs 0.08 ms),
    which makes timings meaningless. Restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
