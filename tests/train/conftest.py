"""Small data for the training tests: 2048 MNIST training images (256 val / test) and a cached
tokenizer folder per session (DST_DATA_CACHE, tests/conftest.py), so that each run takes seconds."""
import pytest
import torch

from train.data import ImageData, load_images


@pytest.fixture(scope="session")
def small_mnist():
    d = load_images("mnist")
    return ImageData("mnist-2k", d.train_x[:2048].clone(), d.train_y[:2048].clone(), d.val_x[:256].clone(),
                     d.val_y[:256].clone(), d.test_x[:256].clone(), d.test_y[:256].clone(), 10)


@pytest.fixture
def tiny_mnist(monkeypatch, small_mnist):
    """train.vit sees the small MNIST whatever --dataset says (bad names are checked elsewhere)."""
    monkeypatch.setattr("train.vit.load_images", lambda spec, data_dir="", seed=0, **kw: small_mnist)
    return small_mnist


@pytest.fixture(autouse=True)
def restore_threads():
    """One torch thread per test: the tiny models gain nothing from more, and an oversubscribed
    CI machine (other jobs on the 2 cores) makes OpenMP's spinning threads 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
