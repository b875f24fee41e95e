import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the small models gain nothing from more, and on an
    oversubscribed 2-core CI machine OpenMP's spinning threads make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
