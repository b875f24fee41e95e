import pytest
import torch
from torch import nn

import dst
import kernels
from dst import DSTConfig, make_layer

from .census import TensorCensus

EXPECTED = {"dense": nn.Linear, "static": kernels.SparseLinear, "set": kernels.SparseLinear,
            "rigl": kernels.SparseLinear, "gse": kernels.SparseLinear, "srigl": kernels.FanInLinear,
            "dynadiag": kernels.DiagLinear}


@pytest.mark.parametrize("method", dst.METHODS)
def test_make_layer_builds_the_format_of_the_method(method):
    layer = make_layer(DSTConfig(method=method), 64, 128, 0.25, generator=torch.Generator().manual_seed(0))
    assert type(layer) is EXPECTED[method]
    assert dst.layer_format(layer) == dst.LAYER_FORMAT[method]
    y = layer(torch.randn(3, 64))
    assert y.shape == (3, 128)


@pytest.mark.parametrize("method", ["static", "srigl", "dynadiag"])
@pytest.mark.parametrize("n_in,n_out", [(1024, 4096), (256, 64)])
def test_sparse_layers_are_created_without_a_dense_weight(method, n_in, n_out):
    census = TensorCensus()
    with census:
        layer = make_layer(DSTConfig(method=method), n_in, n_out, 0.05, generator=torch.Generator().manual_seed(0))
    assert census.largest < n_in * n_out
    assert layer.density() == pytest.approx(0.05, rel=0.25)


def test_dynadiag_layer_takes_the_block_size_of_the_config():
    layer = make_layer(DSTConfig(method="dynadiag", block_size=16), 64, 128, 0.25)
    assert layer.block_size == 16 and layer.values.shape[2:] == (16, 16)


def test_make_layer_keeps_bias_dtype_and_device_arguments():
    layer = make_layer(DSTConfig(method="rigl"), 32, 16, 0.5, bias=False, dtype=torch.float64, device="cpu")
    assert layer.bias is None and layer.values.dtype == torch.float64


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5, True])
def test_density_outside_zero_one_is_rejected(density):
    with pytest.raises(ValueError, match="density"):
        make_layer(DSTConfig(method="rigl"), 32, 16, density)


def test_make_layer_validates_the_config():
    with pytest.raises(ValueError, match="method"):
        make_layer(DSTConfig(method="magnitude"), 32, 16, 0.5)
